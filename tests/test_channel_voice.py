"""The AI voice-agent adapter and its outcome webhook (SPEC §4.8, §7), end to end on both databases:
the engine dispatches a voice stage to a real HTTP server standing in for the voice service, and the
service's signed outcome webhook moves the case."""

from __future__ import annotations

import json
import time
from datetime import date, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from duecourse.channels.base import OutboundMessage, ProviderError
from duecourse.channels.registry import Providers, ProviderEnv
from duecourse.channels.voice import VoiceProvider
from duecourse.channels.webhooks import SIGNATURE_HEADER, sign
from duecourse.engine.cycle import tick
from duecourse.engine.models import ExecutionLogEntry, Interaction, QueueItem
from duecourse.ledger.models import Account, Promise
from duecourse.messaging.models import Template
from tests.engine_helpers import debtor, items, log, refresh, strategy
from tests.fake_voice import FakeVoice

SCRIPT = "Hola {{ debtor_name }}, le llamamos por la factura {{ carrying_invoice_number }}: debe {{ balance }} {{ currency }}."


@pytest.fixture
def fake():
    from duecourse.engine import dispatch

    breakers = getattr(dispatch, "_BREAKERS", None)  # the dispatch's per-process provider cool-down
    if breakers is not None:
        breakers.clear()
    server = FakeVoice().start()
    yield server
    server.stop()


# --- the adapter alone -------------------------------------------------------------------------------


def _message(**context):
    ctx = {"queue_item_id": 41, "debtor_name": "Ana García", "account_external_id": "ACC-9", "balance": "250.00",
           "currency": "EUR", "carrying_invoice_id": 7, "stage_index": 0, "tone": "firm", "language": "es",
           "timezone": "Europe/Madrid", **context}
    return OutboundMessage(organization_id=3, account_id=9, channel="voice", to="+34600111222",
                           body_text="Hola Ana, debe 250,00 €.", idempotency_key="qi-41", tone="firm", context=ctx)


def _provider(fake, *, timeout=5.0, secrets=None):
    env = ProviderEnv(organization_id=3, channel="voice", public_url="https://collect.example.com/", timeout_seconds=timeout)
    settings = {"endpoint_url": fake.url, "agent_id": "agent-7", "caller_id": "+34910000000"}
    return VoiceProvider(settings, {"api_key": "vk_test"} if secrets is None else secrets, env)


def test_the_call_request_carries_the_script_the_debtor_and_the_callback(fake):
    result = _provider(fake).send(_message(carrying_invoice_number="F-2026-11", carrying_invoice_due_date="2026-02-01"))
    assert result.provider_ref == "call-1"
    (req,) = fake.requests
    assert req.path == "/v1/calls"
    assert req.headers["authorization"] == "Bearer vk_test" and req.headers["idempotency-key"] == "qi-41"
    body = req.body
    assert body["idempotency_key"] == "qi-41" and body["to"] == "+34600111222"
    assert (body["agent_id"], body["caller_id"]) == ("agent-7", "+34910000000")
    assert body["script"] == "Hola Ana, debe 250,00 €." and (body["tone"], body["language"]) == ("firm", "es")
    assert body["debtor"] == {
        "name": "Ana García", "balance": "250.00", "currency": "EUR", "account_external_id": "ACC-9",
        "carrying_invoice_id": 7, "carrying_invoice_number": "F-2026-11", "carrying_invoice_due_date": "2026-02-01",
    }
    assert body["callback_url"] == "https://collect.example.com/api/v1/webhooks/3/voice/outcome"
    # The same attempt again: the service sees the same idempotency key and answers the same call.
    assert _provider(fake).send(_message()).provider_ref == "call-1"


def test_no_api_key_means_no_authorization_header(fake):
    _provider(fake, secrets={}).send(_message())
    assert "authorization" not in fake.requests[0].headers


@pytest.mark.parametrize(("mode", "retryable", "invalid"), [
    ("error500", True, False),
    ("rate_limited", True, False),
    ("invalid_number", False, True),
    ("bad_request", False, False),
])
def test_provider_errors_are_classified(fake, mode, retryable, invalid):
    fake.mode = mode
    with pytest.raises(ProviderError) as exc:
        _provider(fake).send(_message())
    assert (exc.value.retryable, exc.value.invalid_address) == (retryable, invalid)


def test_a_slow_service_times_out_and_is_retryable(fake):
    fake.mode, fake.slow_seconds = "slow", 1.5
    started = time.monotonic()
    with pytest.raises(ProviderError) as exc:
        _provider(fake, timeout=0.3).send(_message())
    assert exc.value.retryable and "timed out" in str(exc.value)
    assert time.monotonic() - started < 1.4


def test_an_unreachable_service_is_retryable(fake):
    provider = _provider(fake)
    fake.stop()
    with pytest.raises(ProviderError) as exc:
        provider.send(_message())
    assert exc.value.retryable


# --- end to end through the engine and the webhook ------------------------------------------------


def _configure(org, fake) -> str:
    r = org.put("/api/v1/channels/voice", json={
        "provider": "voice_http",
        "settings": {"endpoint_url": fake.url, "agent_id": "agent-7", "caller_id": "+34910000000"},
        "secrets": {"api_key": "vk_test"},
    })
    assert r.status_code == 200, r.text
    secret = r.json()["generated_secrets"]["webhook_secret"]
    assert secret.startswith("whsec_")
    return secret


def _scenario(db, org, now, *, retries=0):
    """A voice stage (with a script) then an email two days later; one debtor owing 100.00."""
    with db.transaction() as s:
        voice = Template(organization_id=org.id, name="call script", channel="voice", tone="standard",
                         body_text=SCRIPT, created_at=now, updated_at=now)
        mail = Template(organization_id=org.id, name="mail", channel="email", tone="standard", subject="Invoice",
                        body_text="Hello {{ debtor_name }}", created_at=now, updated_at=now)
        s.add_all([voice, mail])
        s.flush()
        st = strategy(s, org.id, now, [("voice", "t", 0), ("email", "p", 2)])
        st.stages[0].template_id, st.stages[1].template_id = voice.id, mail.id
        st.stages[0].max_retries, st.stages[0].retry_delay_hours = retries, 4
        a = debtor(s, org.id, now, "VOX", due=date(2026, 3, 1), name="Ana García")
        refresh(s, org.id, now)
        return a.id


def _post(org, secret, payload, *, now, raw=None, signature=None):
    body = raw if raw is not None else json.dumps(payload).encode()
    header = signature or sign(secret, body, int(now.timestamp()))
    return org.client.post(f"/api/v1/webhooks/{org.id}/voice/outcome", content=body,
                           headers={SIGNATURE_HEADER: header, "Content-Type": "application/json"})


def _state(db, account_id):
    with db.transaction() as s:
        acct = s.get(Account, account_id)
        return {
            "status": str(acct.status), "next_stage": acct.case_next_stage,
            "items": items(s, account_id), "log": log(s, account_id),
            "promises": s.scalar(select(func.count()).select_from(Promise).where(Promise.account_id == account_id)),
            "outcomes": [str(i.outcome) if i.outcome else None
                         for i in s.scalars(select(Interaction).where(Interaction.account_id == account_id).order_by(Interaction.id))],
        }


def _dispatch_call(db, org, app, clock, fake, **kw):
    secret = _configure(org, fake)
    aid = _scenario(db, org, clock.now(), **kw)
    r = tick(db, now=clock.now(), providers=Providers(app.state.settings))
    assert r["dispatch"] == {"dispatched": 1}
    return secret, aid


def test_a_call_goes_out_and_a_promise_comes_back(db, org, app, clock, fake):
    secret, aid = _dispatch_call(db, org, app, clock, fake)
    (req,) = fake.requests
    with db.transaction() as s:
        item = s.scalars(select(QueueItem).where(QueueItem.account_id == aid)).one()
        assert (item.status, item.provider_ref) == ("completed", "call-1")
        acct = s.get(Account, aid)
        assert acct.case_next_stage == 0  # a voice stage waits for its outcome
    assert req.headers["idempotency-key"] == f"qi-{item.id}" and req.headers["authorization"] == "Bearer vk_test"
    body = req.body
    assert body["script"].startswith("Hola Ana García, le llamamos por la factura VOX-1: debe ")
    assert "100" in body["script"] and body["script"].endswith(" EUR.") and "{{" not in body["script"]
    assert body["to"] == "+34600111222" and body["agent_id"] == "agent-7" and body["caller_id"] == "+34910000000"
    assert body["debtor"]["name"] == "Ana García" and body["debtor"]["currency"] == "EUR"
    assert Decimal(body["debtor"]["balance"]) == Decimal("100") and body["debtor"]["account_external_id"] == "VOX"
    assert body["callback_url"] == f"http://127.0.0.1:8000/api/v1/webhooks/{org.id}/voice/outcome"

    clock.advance(minutes=7)
    event = {"id": "evt-1", "call_id": "call-1", "status": "completed", "outcome": "promise_to_pay",
             "promise_amount": "60.00", "promise_date": "2026-03-10", "sentiment": "positive", "willingness": 4,
             "summary": "Will pay 60 on the 10th", "transcript": "Agent: Hola...\nDebtor: Pagaré el día 10."}
    r = _post(org, secret, event, now=clock.now())
    assert r.status_code == 200, r.text
    assert r.json() == {"result": "completed"}
    state = _state(db, aid)
    assert state["status"] == "promise_pending" and state["promises"] == 1
    assert state["outcomes"] == ["promise_to_pay"]
    events = [(e, st, why) for e, st, why in state["log"]]
    assert ("outcome", 0, "promise_to_pay") in events and any(e[0] == "promise" for e in events)
    with db.transaction() as s:
        promise = s.scalars(select(Promise).where(Promise.account_id == aid)).one()
        assert (promise.amount, promise.promised_date, str(promise.source)) == (Decimal("60"), date(2026, 3, 10), "voice_call")
        inter = s.scalars(select(Interaction).where(Interaction.account_id == aid)).one()
        assert (str(inter.sentiment), inter.willingness, inter.summary) == ("positive", 4, "Will pay 60 on the 10th")
        assert inter.transcript.startswith("Agent: Hola")
        entry = s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.account_id == aid,
                                                          ExecutionLogEntry.event == "outcome")).one()
        assert entry.details == {"sentiment": "positive", "willingness": 4}
    # The execution log is visible through the API too.
    r = org.get("/api/v1/execution-log", params={"account_id": aid, "event": "outcome"})
    assert r.status_code == 200 and [e["reason"] for e in r.json()["items"]] == ["promise_to_pay"]

    # A replay of the same event changes nothing.
    before = _state(db, aid)
    r = _post(org, secret, event, now=clock.now())
    assert r.status_code == 200 and r.json() == {"result": "duplicate"}
    assert _state(db, aid) == before


def test_no_answer_schedules_the_retry(db, org, app, clock, fake):
    secret, aid = _dispatch_call(db, org, app, clock, fake, retries=1)
    clock.advance(minutes=2)
    r = _post(org, secret, {"id": "evt-na", "call_id": "call-1", "status": "no_answer"}, now=clock.now())
    assert r.json() == {"result": "retry"}
    state = _state(db, aid)
    assert state["items"][-1][:2] == (0, "pending") and state["items"][-1][2] == clock.now() + timedelta(hours=4)
    assert ("retry", 0, "no_answer") in state["log"] and state["outcomes"] == ["no_answer"]
    # Busy is the same as no answer; the retries are used up now, so the case advances.
    org.patch("/api/v1/settings", json={"dispatch": {"frequency_limits": {"overall": {"per_day": 3}}}})
    clock.advance(hours=4)
    assert tick(db, now=clock.now(), providers=Providers(app.state.settings))["dispatch"] == {"dispatched": 1}
    assert len(fake.requests) == 2
    r = _post(org, secret, {"id": "evt-busy", "call_id": "call-2", "status": "busy"}, now=clock.now())
    assert r.json() == {"result": "advanced"}
    assert _state(db, aid)["next_stage"] == 1


def test_a_call_that_never_connects_is_a_delivery_failure(db, org, app, clock, fake):
    secret, aid = _dispatch_call(db, org, app, clock, fake)
    r = _post(org, secret, {"id": "evt-f", "call_id": "call-1", "status": "failed", "summary": "number unreachable"},
              now=clock.now())
    assert r.json() == {"result": "delivery_failure"}
    state = _state(db, aid)
    assert ("delivery_failed", 0, "failed") in state["log"]
    assert state["next_stage"] == 1 and state["items"][-1][:2] == (1, "pending")
    assert state["items"][-1][2] == clock.now()  # the email is sent at once, not two days later


def test_forged_stale_malformed_and_unknown_events_change_nothing(db, org, app, clock, fake):
    secret, aid = _dispatch_call(db, org, app, clock, fake)
    before = _state(db, aid)
    good = {"id": "evt-x", "call_id": "call-1", "status": "completed", "outcome": "refused", "sentiment": "negative"}

    r = _post(org, "whsec_forged", good, now=clock.now())
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = _post(org, secret, good, now=clock.now() - timedelta(minutes=10))
    assert r.status_code == 401 and "window" in r.json()["error"]["message"]
    r = org.client.post(f"/api/v1/webhooks/{org.id}/voice/outcome", json=good)
    assert r.status_code == 401
    r = _post(org, secret, None, now=clock.now(), raw=b'{"id": "evt-x", "call_id": ')
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_webhook"
    r = _post(org, secret, None, now=clock.now(), raw=b'["not", "an", "object"]')
    assert r.status_code == 400
    r = _post(org, secret, {**good, "status": "exploded"}, now=clock.now())
    assert r.status_code == 400 and "status" in r.json()["error"]["message"]
    r = _post(org, secret, {"id": "evt-y", "call_id": "call-1", "status": "completed", "outcome": "promise_to_pay"},
              now=clock.now())
    assert r.status_code == 400 and "promise_amount" in r.json()["error"]["message"]
    r = _post(org, secret, {**good, "id": "evt-z", "call_id": "call-404"}, now=clock.now())
    assert r.status_code == 400 and "unknown call_id 'call-404'" in r.json()["error"]["message"]
    assert _state(db, aid) == before
    # After all that, the genuine event still goes through once (the failed ones did not use up its id).
    assert _post(org, secret, good, now=clock.now()).json() == {"result": "completed"}
    assert _state(db, aid)["outcomes"] == ["refused"]


def test_another_organizations_secret_does_not_sign_for_this_one(db, org, other_org, app, clock, fake):
    secret, aid = _dispatch_call(db, org, app, clock, fake)
    other_secret = _configure(other_org, fake)
    body = json.dumps({"id": "e1", "call_id": "call-1", "status": "no_answer"}).encode()
    r = org.client.post(f"/api/v1/webhooks/{org.id}/voice/outcome", content=body,
                        headers={SIGNATURE_HEADER: sign(other_secret, body, int(clock.now().timestamp()))})
    assert r.status_code == 401
    # Signed correctly for the other organization, the call is not one of its calls.
    r = org.client.post(f"/api/v1/webhooks/{other_org.id}/voice/outcome", content=body,
                        headers={SIGNATURE_HEADER: sign(other_secret, body, int(clock.now().timestamp()))})
    assert r.status_code == 400 and "unknown call_id" in r.text
    assert _state(db, aid)["outcomes"] == [None]


def test_a_failing_voice_service_is_retried_with_backoff(db, org, app, clock, fake):
    _configure(org, fake)
    fake.mode = "error500"
    aid = _scenario(db, org, clock.now())
    r = tick(db, now=clock.now(), providers=Providers(app.state.settings))
    assert r["dispatch"] == {"retry": 1}
    with db.transaction() as s:
        item = s.scalars(select(QueueItem).where(QueueItem.account_id == aid)).one()
        assert item.status == "pending" and "500" in item.error and item.scheduled_at > clock.now()
    fake.mode = "ok"
    clock.set(item.scheduled_at)
    assert tick(db, now=clock.now(), providers=Providers(app.state.settings))["dispatch"] == {"dispatched": 1}
    with db.transaction() as s:
        assert s.get(QueueItem, item.id).provider_ref == "call-1"


def test_the_webhook_contract_is_in_the_openapi_document(client):
    spec = client.app.openapi()
    op = spec["paths"]["/api/v1/webhooks/{organization_id}/voice/outcome"]["post"]
    assert SIGNATURE_HEADER in op["description"] and "HMAC-SHA256" in op["description"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert {"id", "call_id", "status", "outcome", "promise_amount", "promise_date", "callback_at", "sentiment",
            "willingness", "summary", "transcript"} <= set(schema["properties"])
    assert all(p.get("description") for p in schema["properties"].values())
    assert set(schema["required"]) == {"id", "call_id", "status"}
