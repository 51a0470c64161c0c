"""Email over real SMTP (SPEC §7): the adapter against a real aiosmtpd server (plain, STARTTLS,
implicit TLS, AUTH, a refused recipient, a server that is down), the unsubscribe page and RFC 8058
one-click POST, the signed bounce webhook, the SMTP check, and the whole path through the engine."""

from __future__ import annotations

import json
import logging
import socket
import ssl
from datetime import date, timedelta
from urllib.parse import urlsplit

import pytest
import trustme
from sqlalchemy import select

from duecourse.channels import webhooks
from duecourse.channels.base import OutboundMessage, ProviderError
from duecourse.channels.links import unsubscribe_url
from duecourse.channels.registry import Providers, ProviderEnv
from duecourse.channels.smtp import CA_FILE_ENV, SmtpProvider, check_connection
from duecourse.engine import dispatch
from duecourse.engine.cycle import tick
from duecourse.engine.models import ExecutionLogEntry, Interaction, QueueItem
from duecourse.ledger.models import Account
from tests.engine_helpers import debtor, items, log, refresh, strategy
from tests.smtp_server import PASSWORD, REFUSED, USERNAME, free_port, smtp_server

API = "/api/v1"
ENV = ProviderEnv(organization_id=1, channel="email", public_url="http://127.0.0.1:8000", timeout_seconds=5.0)


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture
def trust_ca(ca: trustme.CA, tmp_path, monkeypatch) -> str:
    """The client trusts the test CA (and only it), through the documented environment variable."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv(CA_FILE_ENV, str(path))
    return str(path)


@pytest.fixture(autouse=True)
def _no_breaker_leaks():
    """The dispatch keeps a per-process circuit breaker per (organization, channel) after a retryable
    provider failure; organization ids repeat between tests, so none may leak into or out of a test."""
    breakers = getattr(dispatch, "_BREAKERS", None)
    if breakers is not None:
        breakers.clear()
    yield
    if breakers is not None:
        breakers.clear()


@pytest.fixture
def plain():
    with smtp_server(security="none") as server:
        yield server


@pytest.fixture
def starttls(server_ctx, trust_ca):
    with smtp_server(security="starttls", server_ctx=server_ctx, auth=True) as server:
        yield server


@pytest.fixture
def implicit_tls(server_ctx, trust_ca):
    with smtp_server(security="tls", server_ctx=server_ctx, auth=True) as server:
        yield server


def settings_for(server, **kw):
    s = {"host": server.host, "port": server.port, "security": server.security,
         "from_address": "billing@acme.example.com", "from_name": "Acme Billing", "reply_to": "help@acme.example.com"}
    s.update(kw)
    return s


def message(to="debtor@example.com", key="qi-1", html="<p>Hello <b>Ann</b></p>", unsubscribe="http://app.example.com/unsubscribe/tok", **kw):
    fields = dict(organization_id=1, account_id=7, channel="email", to=to, subject="Invoice INV-1 is overdue",
                  body_text="Hello Ann, you owe 100.00 EUR.", body_html=html, idempotency_key=key,
                  context={"unsubscribe_url": unsubscribe} if unsubscribe else {})
    fields.update(kw)
    return OutboundMessage(**fields)


# --- the adapter against a real server ------------------------------------------------------------


def test_plain_send_multipart_with_every_header(plain):
    result = SmtpProvider(settings_for(plain), {}, ENV).send(message())
    [got] = plain.handler.messages
    m = got.message
    assert got.mail_from == "billing@acme.example.com" and got.rcpt_tos == ["debtor@example.com"] and not got.tls
    assert m["From"] == "Acme Billing <billing@acme.example.com>"
    assert m["To"] == "debtor@example.com"
    assert m["Reply-To"] == "help@acme.example.com"
    assert m["Subject"] == "Invoice INV-1 is overdue"
    assert m["Date"]
    # provider_ref is the Message-ID without its angle brackets, on the sender's domain
    assert m["Message-ID"] == f"<{result.provider_ref}>" and result.provider_ref.endswith("@acme.example.com")
    assert m["List-Unsubscribe"] == "<http://app.example.com/unsubscribe/tok>"
    assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert m.get_content_type() == "multipart/alternative"
    parts = [(p.get_content_type(), p.get_content().strip()) for p in m.iter_parts()]
    assert parts == [("text/plain", "Hello Ann, you owe 100.00 EUR."), ("text/html", "<p>Hello <b>Ann</b></p>")]


def test_text_only_without_unsubscribe_link(plain):
    SmtpProvider(settings_for(plain, from_name=None, reply_to=None), {}, ENV).send(message(html=None, unsubscribe=None))
    [got] = plain.handler.messages
    m = got.message
    assert m.get_content_type() == "text/plain" and m.get_content().strip() == "Hello Ann, you owe 100.00 EUR."
    assert m["From"] == "billing@acme.example.com"
    assert m["Reply-To"] is None and m["List-Unsubscribe"] is None and m["List-Unsubscribe-Post"] is None


def test_non_ascii_names_subject_and_bodies(plain):
    SmtpProvider(settings_for(plain, from_name="Cobros Ñandú"), {}, ENV).send(
        message(subject="Factura vencida – señor Núñez", body_text="Hola José, debe 100,00 €.", html="<p>Hola José €</p>"))
    [got] = plain.handler.messages
    m = got.message
    assert m["From"] == "Cobros Ñandú <billing@acme.example.com>" and m["Subject"] == "Factura vencida – señor Núñez"
    assert [p.get_content().strip() for p in m.iter_parts()] == ["Hola José, debe 100,00 €.", "<p>Hola José €</p>"]


def test_message_id_is_stable_per_attempt_and_unique_per_item(plain):
    provider = SmtpProvider(settings_for(plain), {}, ENV)
    a = provider.send(message(key="qi-1")).provider_ref
    again = provider.send(message(key="qi-1")).provider_ref
    b = provider.send(message(key="qi-2")).provider_ref
    assert a == again and a != b
    assert [r.message["Message-ID"] for r in plain.handler.messages] == [f"<{a}>", f"<{a}>", f"<{b}>"]


def test_a_subject_cannot_inject_headers(plain):
    SmtpProvider(settings_for(plain), {}, ENV).send(message(subject="Hi\r\nBcc: victim@example.com"))
    [got] = plain.handler.messages
    assert got.message["Bcc"] is None and got.rcpt_tos == ["debtor@example.com"]
    assert got.message["Subject"] == "Hi Bcc: victim@example.com"


def test_starttls_with_auth(starttls):
    SmtpProvider(settings_for(starttls, username=USERNAME), {"password": PASSWORD}, ENV).send(message())
    [got] = starttls.handler.messages
    assert got.tls and got.login == USERNAME


def test_implicit_tls_with_auth(implicit_tls):
    SmtpProvider(settings_for(implicit_tls, username=USERNAME), {"password": PASSWORD}, ENV).send(message())
    [got] = implicit_tls.handler.messages
    assert got.tls and got.login == USERNAME


def test_auth_over_plain_when_the_server_allows_it():
    with smtp_server(security="none", auth=True, auth_require_tls=False) as server:
        SmtpProvider(settings_for(server, username=USERNAME), {"password": PASSWORD}, ENV).send(message())
        [got] = server.handler.messages
        assert got.login == USERNAME and not got.tls


def test_untrusted_certificate_is_a_permanent_error(server_ctx, monkeypatch):
    monkeypatch.delenv(CA_FILE_ENV, raising=False)  # only the system's CAs: the test CA is unknown
    with smtp_server(security="starttls", server_ctx=server_ctx) as server:
        with pytest.raises(ProviderError) as exc:
            SmtpProvider(settings_for(server), {}, ENV).send(message())
        assert exc.value.retryable is False and "certificate" in str(exc.value)
        assert server.handler.messages == []


def test_wrong_password_is_permanent_and_never_shown(starttls, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-Pa55word-abc"
    with pytest.raises(ProviderError) as exc:
        SmtpProvider(settings_for(starttls, username=USERNAME), {"password": wrong}, ENV).send(message())
    err = exc.value
    assert err.retryable is False and err.invalid_address is False
    assert "authentication failed" in str(err) and USERNAME in str(err)
    assert wrong not in str(err) and wrong not in caplog.text and PASSWORD not in caplog.text
    assert starttls.handler.messages == []


def test_starttls_required_but_not_offered(plain):
    with pytest.raises(ProviderError) as exc:
        SmtpProvider(settings_for(plain, security="starttls"), {}, ENV).send(message())
    assert exc.value.retryable is False and "STARTTLS" in str(exc.value)


def test_auth_not_offered_on_a_plain_connection():
    with smtp_server(security="none", auth=True) as server:  # AUTH only after TLS: not advertised here
        with pytest.raises(ProviderError) as exc:
            SmtpProvider(settings_for(server, username=USERNAME), {"password": PASSWORD}, ENV).send(message())
        assert exc.value.retryable is False and "AUTH" in str(exc.value)
        assert PASSWORD not in str(exc.value)


def test_tls_against_a_plain_port_is_a_configuration_error(plain):
    with pytest.raises(ProviderError) as exc:
        SmtpProvider(settings_for(plain, security="tls"), {}, ENV).send(message())
    assert exc.value.retryable is False and "TLS" in str(exc.value)


def test_refused_recipient_is_an_invalid_address(plain):
    with pytest.raises(ProviderError) as exc:
        SmtpProvider(settings_for(plain), {}, ENV).send(message(to=REFUSED))
    assert (exc.value.retryable, exc.value.invalid_address) == (False, True)
    assert "550" in str(exc.value) and "recipient refused" in str(exc.value)
    assert plain.handler.messages == []


def test_server_down_is_retryable():
    port = free_port()  # nothing listens there
    with pytest.raises(ProviderError) as exc:
        SmtpProvider({"host": "127.0.0.1", "port": port, "security": "none", "from_address": "a@acme.example.com"}, {}, ENV).send(message())
    assert exc.value.retryable is True and "connection refused" in str(exc.value)


def test_silent_server_times_out_and_is_retryable():
    with socket.socket() as listener:  # accepts the TCP connection, never greets
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        env = ProviderEnv(1, "email", "http://x", timeout_seconds=0.5)
        with pytest.raises(ProviderError) as exc:
            SmtpProvider({"host": "127.0.0.1", "port": listener.getsockname()[1], "security": "none",
                          "from_address": "a@acme.example.com"}, {}, env).send(message())
    assert exc.value.retryable is True and "timed out" in str(exc.value)


def test_a_message_the_server_has_whole_but_never_confirms_is_not_sent_again(plain):
    # The server keeps the message and does not answer the end of DATA in time: it may deliver it,
    # so a retry could deliver it twice.
    plain.handler.slow_data_seconds = 1.5
    env = ProviderEnv(1, "email", "http://x", timeout_seconds=0.5)
    with pytest.raises(ProviderError) as exc:
        SmtpProvider(settings_for(plain), {}, env).send(message())
    assert exc.value.retryable is False and "may have been delivered" in str(exc.value)
    assert len(plain.handler.messages) == 1


def test_invalid_recipient_address_is_refused_before_connecting(plain):
    with pytest.raises(ProviderError) as exc:
        SmtpProvider(settings_for(plain), {}, ENV).send(message(to="not an address"))
    assert (exc.value.retryable, exc.value.invalid_address) == (False, True)


def test_check_connection(starttls, implicit_tls):
    assert check_connection(settings_for(starttls, username=USERNAME), {"password": PASSWORD}, 5) is None
    assert check_connection(settings_for(implicit_tls, username=USERNAME), {"password": PASSWORD}, 5) is None
    bad = check_connection(settings_for(starttls, username=USERNAME), {"password": "nope-nope-nope"}, 5)
    assert bad and "authentication failed" in bad and "nope-nope-nope" not in bad
    assert "no password" in check_connection(settings_for(starttls, username=USERNAME), {}, 5)
    assert "connection refused" in check_connection(settings_for(starttls, port=free_port()), {}, 5)
    assert "invalid SMTP settings: host" in check_connection({"from_address": "a@acme.example.com"}, {}, 5)
    assert starttls.handler.messages == [] and implicit_tls.handler.messages == []


# --- through the API and the engine ----------------------------------------------------------------


def _configure(org, server, **kw):
    body = {"provider": "smtp", "settings": settings_for(server, **kw)}
    if kw.get("username"):
        body["secrets"] = {"password": PASSWORD}
    r = org.put(f"{API}/channels/email", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _scenario(db, org, clock, stages=(("email", "t", 0), ("email", "p", 3)), email="ann@example.com"):
    """An email template with the unsubscribe link, a strategy of email stages, one overdue debtor."""
    now = clock.now()
    r = org.post(f"{API}/templates", json={
        "name": "Reminder", "channel": "email", "subject": "Invoice {{ carrying_invoice_number }} is overdue",
        "body_text": "Hello {{ debtor_name }}, you owe {{ balance }}. Unsubscribe: {{ unsubscribe_link }}",
        "body_html": "<p>Hello {{ debtor_name }}</p><p><a href=\"{{ unsubscribe_link }}\">Unsubscribe</a></p>",
    })
    assert r.status_code == 201, r.text
    with db.transaction() as s:
        st = strategy(s, org.id, now, list(stages))
        for stage in st.stages:
            stage.template_id = r.json()["id"]
        a = debtor(s, org.id, now, "ANN", due=date(2026, 3, 1), email=email)
        refresh(s, org.id, now)
        return a.id


def _signing_secret(org) -> str:
    r = org.post(f"{API}/channels-inbound/rotate-secret")
    assert r.status_code == 200
    return r.json()["signing_secret"]


def _post_signed(client, clock, org_id, secret, event, path="email/bounce"):
    body = json.dumps(event).encode()
    header = webhooks.sign(secret, body, int(clock.now().timestamp()))
    return client.post(f"{API}/webhooks/{org_id}/{path}", content=body,
                       headers={"Content-Type": "application/json", webhooks.SIGNATURE_HEADER: header})


def _queue(db, account_id):
    with db.transaction() as s:
        return s.scalars(select(QueueItem).where(QueueItem.account_id == account_id).order_by(QueueItem.id)).all()


def test_end_to_end_send_bounce_unsubscribe(db, org, clock, app, client, starttls):
    out = _configure(org, starttls, username=USERNAME)
    assert out["provider"] == "smtp" and PASSWORD not in json.dumps(out)
    assert org.post(f"{API}/channels/email/check").json() == {"ok": True, "error": None}
    aid = _scenario(db, org, clock)
    providers = Providers(app.state.settings)

    # The engine sends the first stage through SMTP.
    assert tick(db, now=clock.now(), providers=providers)["dispatch"] == {"dispatched": 1}
    [got] = starttls.handler.messages
    m = got.message
    assert got.tls and got.login == USERNAME and got.rcpt_tos == ["ann@example.com"]
    assert m["Subject"] == "Invoice ANN-1 is overdue" and m["From"] == "Acme Billing <billing@acme.example.com>"
    link = unsubscribe_url(app.state.settings.public_url, app.state.settings.secret_key,
                           organization_id=org.id, account_id=aid, channel="email")
    assert m["List-Unsubscribe"] == f"<{link}>" and m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    text, html = (p.get_content() for p in m.iter_parts())
    assert f"Unsubscribe: {link}" in text and f'href="{link}"' in html
    [item] = _queue(db, aid)
    assert item.status == "completed" and m["Message-ID"] == f"<{item.provider_ref}>"
    with db.transaction() as s:
        assert s.scalars(select(Interaction.status).where(Interaction.queue_item_id == item.id)).one() == "sent"

    # The next day the second stage is queued for day 3; a hard bounce of the first arrives.
    clock.advance(days=1)
    tick(db, now=clock.now(), providers=providers)
    assert [(i.stage_index, i.status) for i in _queue(db, aid)] == [(0, "completed"), (1, "pending")]
    secret = _signing_secret(org)
    bounce = {"id": "evt-1", "message_id": f"<{item.provider_ref}>", "recipient": "ann@example.com", "type": "hard",
              "reason": "550 5.1.1 user unknown"}
    r = _post_signed(client, clock, org.id, secret, bounce)
    assert r.status_code == 200 and r.json() == {"result": "delivery_failure"}
    assert _post_signed(client, clock, org.id, secret, bounce).json() == {"result": "duplicate"}
    queue = _queue(db, aid)
    assert [(i.stage_index, i.status, i.reason) for i in queue] == [
        (0, "completed", None), (1, "cancelled", "delivery_failure"), (1, "pending", None)]
    assert queue[2].scheduled_at == clock.now()  # the next stage at once
    with db.transaction() as s:
        assert s.scalars(select(Interaction.status).where(Interaction.queue_item_id == item.id)).one() == "bounced"
        entry = s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.account_id == aid,
                                                          ExecutionLogEntry.event == "delivery_failed")).one()
        assert (entry.reason, entry.queue_item_id) == ("bounced", item.id)
        assert "550 5.1.1 user unknown" in entry.details["error"]

    # The debtor opens the link (a page, nothing changes), then one-click unsubscribes without cookies.
    path = urlsplit(link).path
    page = client.get(path)
    assert page.status_code == 200 and 'method="post"' in page.text and "Acme Receivables" in page.text
    assert _account(db, aid).opt_out_email is False
    client.cookies.clear()
    r = client.post(path, content=b"List-Unsubscribe=One-Click",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and "unsubscribed" in r.text
    acct = _account(db, aid)
    assert acct.opt_out_email is True and acct.opt_out_sms is False
    with db.transaction() as s:
        assert ("opted_out", None, "unsubscribe_link") in log(s, aid)

    # The next email stage is skipped for the opt-out; nothing more reaches the server.
    assert tick(db, now=clock.now(), providers=providers)["dispatch"] == {"skipped": 1}
    assert len(starttls.handler.messages) == 1
    with db.transaction() as s:
        assert items(s, aid)[-1][1::2] == ("skipped", "opt_out")
        assert _account(db, aid).status == "sequence_completed"


def _account(db, aid):
    with db.transaction() as s:
        return s.get(Account, aid)


def test_soft_bounce_is_only_logged(db, org, clock, app, client, plain):
    _configure(org, plain)
    aid = _scenario(db, org, clock)
    tick(db, now=clock.now(), providers=Providers(app.state.settings))
    [item] = _queue(db, aid)
    secret = _signing_secret(org)
    r = _post_signed(client, clock, org.id, secret, {"id": "s-1", "message_id": item.provider_ref, "type": "soft",
                                                     "recipient": "ann@example.com", "reason": "452 mailbox full"})
    assert r.status_code == 200 and r.json() == {"result": "logged"}
    [after] = _queue(db, aid)
    assert after.status == "completed"
    with db.transaction() as s:
        assert s.scalars(select(Interaction.status).where(Interaction.queue_item_id == item.id)).one() == "sent"
        assert log(s, aid)[-1] == ("soft_bounce", 0, "soft_bounce")
        assert _account(db, aid).case_next_stage == 1


def test_bounce_webhook_refuses_bad_input_and_changes_nothing(db, org, other_org, clock, app, client, plain):
    _configure(org, plain)
    aid = _scenario(db, org, clock)
    tick(db, now=clock.now(), providers=Providers(app.state.settings))
    [item] = _queue(db, aid)
    secret = _signing_secret(org)
    good = {"id": "e-1", "message_id": item.provider_ref, "type": "hard"}
    # forged signature, wrong organization's secret, missing header
    assert _post_signed(client, clock, org.id, "whsec_forged", good).status_code == 401
    assert _post_signed(client, clock, org.id, _signing_secret(other_org), good).status_code == 401
    assert client.post(f"{API}/webhooks/{org.id}/email/bounce", json=good).status_code == 401
    # signed, but malformed or about an unknown message
    assert _post_signed(client, clock, org.id, secret, {**good, "type": "maybe"}).status_code == 400
    assert _post_signed(client, clock, org.id, secret, {"id": "e-2", "type": "hard"}).status_code == 400
    r = _post_signed(client, clock, org.id, secret, {**good, "id": "e-3", "message_id": "nope@acme.example.com"})
    assert r.status_code == 400 and "unknown message" in r.json()["error"]["message"]
    # another organization cannot bounce this organization's message with its own secret
    r = _post_signed(client, clock, other_org.id, _signing_secret(other_org), {**good, "id": "e-4"})
    assert r.status_code == 400
    # a stale signature is refused
    body = json.dumps(good).encode()
    old = webhooks.sign(secret, body, int((clock.now() - timedelta(minutes=10)).timestamp()))
    r = client.post(f"{API}/webhooks/{org.id}/email/bounce", content=body, headers={webhooks.SIGNATURE_HEADER: old})
    assert r.status_code == 401
    [after] = _queue(db, aid)
    assert after.status == "completed"
    with db.transaction() as s:
        assert s.scalars(select(Interaction.status).where(Interaction.queue_item_id == item.id)).one() == "sent"
        assert "delivery_failed" not in [e[0] for e in log(s, aid)]
    # the id of a refused event was not consumed: the genuine event still works
    assert _post_signed(client, clock, org.id, secret, {**good, "id": "e-3"}).json() == {"result": "delivery_failure"}


def test_forged_or_foreign_unsubscribe_tokens_change_nothing(db, org, clock, app, client):
    aid = _scenario(db, org, clock)
    settings = app.state.settings
    real = urlsplit(unsubscribe_url(settings.public_url, settings.secret_key, organization_id=org.id, account_id=aid,
                                    channel="email")).path
    forged = urlsplit(unsubscribe_url(settings.public_url, "another-secret", organization_id=org.id, account_id=aid,
                                      channel="email")).path
    tampered = real[:-3] + ("AAA" if not real.endswith("AAA") else "BBB")
    for path in (forged, tampered, "/unsubscribe/garbage"):
        assert client.get(path).status_code == 404
        assert client.post(path, content=b"List-Unsubscribe=One-Click").status_code == 404
    # a genuine token naming another organization's account id does not exist there
    wrong_org = urlsplit(unsubscribe_url(settings.public_url, settings.secret_key, organization_id=org.id + 999,
                                         account_id=aid, channel="email")).path
    assert client.post(wrong_org).status_code == 404
    acct = _account(db, aid)
    assert (acct.opt_out_email, acct.opt_out_sms, acct.opt_out_whatsapp, acct.opt_out_voice) == (False,) * 4
    with db.transaction() as s:
        assert "opted_out" not in [e[0] for e in log(s, aid)]


def test_unsubscribe_is_per_channel_and_idempotent(db, org, clock, app, client):
    aid = _scenario(db, org, clock)
    settings = app.state.settings
    sms = urlsplit(unsubscribe_url(settings.public_url, settings.secret_key, organization_id=org.id, account_id=aid,
                                   channel="sms")).path
    page = client.get(sms)
    assert page.status_code == 200 and "text messages" in page.text
    assert page.headers["cache-control"] == "no-store" and page.headers["referrer-policy"] == "no-referrer"
    assert client.post(sms).status_code == 200  # the page's button: no one-click body needed
    assert client.post(sms, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    acct = _account(db, aid)
    assert (acct.opt_out_sms, acct.opt_out_email) == (True, False)
    with db.transaction() as s:
        entries = s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.account_id == aid,
                                                            ExecutionLogEntry.event == "opted_out")).all()
        assert [(e.reason, e.details) for e in entries] == [("unsubscribe_link", {"channel": "sms"})]
    assert "no longer receive" in client.get(sms).text


def test_engine_failures_from_smtp(db, org, clock, app, plain):
    # A refused recipient fails the stage at once (not retried) and the case moves on.
    _configure(org, plain)
    aid = _scenario(db, org, clock, email=REFUSED)
    providers = Providers(app.state.settings)
    assert tick(db, now=clock.now(), providers=providers)["dispatch"] == {"failed": 1}
    [item] = _queue(db, aid)
    assert (item.status, item.reason) == ("failed", "provider_error") and "550" in item.error
    assert _account(db, aid).case_next_stage == 1
    assert plain.handler.messages == []


def test_engine_retries_when_the_server_is_down(db, org, clock, app):
    r = org.put(f"{API}/channels/email", json={"provider": "smtp", "settings": {
        "host": "127.0.0.1", "port": free_port(), "security": "none", "from_address": "billing@acme.example.com"}})
    assert r.status_code == 200
    aid = _scenario(db, org, clock)
    assert tick(db, now=clock.now(), providers=Providers(app.state.settings))["dispatch"] == {"retry": 1}
    [item] = _queue(db, aid)
    assert item.status == "pending" and "connection refused" in item.error and item.scheduled_at > clock.now()
    assert _account(db, aid).case_next_stage in (None, 0)


def test_check_endpoint(db, org, clock, plain, starttls):
    assert org.post(f"{API}/channels/email/check").json()["ok"] is False  # still the sandbox
    _configure(org, starttls, username=USERNAME)
    assert org.post(f"{API}/channels/email/check", role="viewer").status_code == 403
    assert org.post(f"{API}/channels/email/check").json() == {"ok": True, "error": None}
    org.put(f"{API}/channels/email", json={"provider": "smtp", "settings": settings_for(starttls, username=USERNAME),
                                           "secrets": {"password": "not-the-password"}})
    r = org.post(f"{API}/channels/email/check").json()
    assert r["ok"] is False and "authentication failed" in r["error"] and "not-the-password" not in r["error"]
    _configure(org, plain, security="starttls")
    r = org.post(f"{API}/channels/email/check").json()
    assert r["ok"] is False and "STARTTLS" in r["error"]
    assert starttls.handler.messages == [] and plain.handler.messages == []
