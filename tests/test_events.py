"""Outbound events (SPEC §7): subscriptions, the transactional outbox, signed deliveries to a real HTTP
server on 127.0.0.1, retries with back-off, the delivery log, redelivery, and tenancy."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from ledger_helpers import error_fields, make_account, make_invoice, make_payment
from sqlalchemy import func, select

from duecourse.channels import webhooks
from duecourse.engine.cycle import tick
from duecourse.engine.models import QueueItem
from duecourse.engine.outcomes import settle_promises
from duecourse.events import service as events
from duecourse.events.models import EventDelivery, EventSubscription
from tests.engine_helpers import debtor, refresh
from tests.test_engine_dispatch import _setup

API = "/api/v1"


# ---------------------------------------------------------------- a receiver on 127.0.0.1


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> dict[str, Any]:
        return json.loads(self.raw)


@dataclass
class Receiver:
    """Answers each POST with the next status of ``statuses`` (the last one repeats)."""

    statuses: list[int] = field(default_factory=lambda: [200])
    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/hooks/duecourse"

    def start(self) -> Receiver:
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                rec.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, raw))
                status = rec.statuses.pop(0) if len(rec.statuses) > 1 else rec.statuses[0]
                answer = b'{"ok":true}' if status < 300 else b"receiver is sad"
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def receiver():
    rec = Receiver().start()
    yield rec
    rec.stop()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/nobody-home"


def subscribe(org, url: str, types: list[str], **kw: Any) -> dict[str, Any]:
    r = org.post(f"{API}/event-subscriptions", json={"url": url, "event_types": types, **kw})
    assert r.status_code == 201, r.text
    return r.json()


def deliveries(org, **params: Any) -> list[dict[str, Any]]:
    r = org.get(f"{API}/event-deliveries", params=params)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def deliver(db, app, clock, **kw: Any) -> dict[str, int]:
    return events.deliver_due(db, now=clock.now(), settings=app.state.settings, timeout=5, **kw)


def assert_signed(rec: Received, secret: str, now: datetime) -> None:
    webhooks.verify(secret, rec.raw, rec.headers["x-duecourse-signature"], now=now)  # raises when invalid
    t = int(rec.headers["x-duecourse-signature"].split(",")[0].removeprefix("t="))
    assert t == int(now.timestamp())


# ---------------------------------------------------------------- subscriptions


def test_subscription_secret_is_shown_once_then_masked(db, org, clock):
    sub = subscribe(org, "https://erp.example.com/hooks", ["promise.created", "payment.received"], description="ERP")
    secret = sub["secret"]
    assert secret.startswith("whsec_") and len(secret) > 30
    assert sub["event_types"] == ["promise.created", "payment.received"] and sub["active"] is True
    got = org.get(f"{API}/event-subscriptions/{sub['id']}").json()
    assert got["secret"] == "••••" + secret[-4:]
    listed = org.get(f"{API}/event-subscriptions", role="viewer")
    assert listed.status_code == 200 and [s["secret"] for s in listed.json()["items"]] == ["••••" + secret[-4:]]
    with db.transaction() as s:
        stored = s.get(EventSubscription, sub["id"])
        assert secret not in stored.secret_encrypted and secret[-8:] not in stored.secret_encrypted
    # rotation: a new secret, shown once
    rotated = org.post(f"{API}/event-subscriptions/{sub['id']}/rotate-secret").json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != secret
    assert org.get(f"{API}/event-subscriptions/{sub['id']}").json()["secret"] == "••••" + rotated["secret"][-4:]
    # readers may list, not manage
    for role in ("viewer", "manager", "agent"):
        assert org.post(f"{API}/event-subscriptions", role=role, json={
            "url": "https://x.example.com", "event_types": ["promise.created"]}).status_code == 403
        assert org.post(f"{API}/event-subscriptions/{sub['id']}/rotate-secret", role=role).status_code == 403
    # update and delete
    r = org.patch(f"{API}/event-subscriptions/{sub['id']}", json={"event_types": ["account.resolved"], "active": False})
    assert r.status_code == 200 and r.json()["event_types"] == ["account.resolved"] and r.json()["active"] is False
    r = org.put(f"{API}/event-subscriptions/{sub['id']}", json={"url": "http://erp.example.com/v2", "event_types": ["promise.kept"]})
    assert r.status_code == 200 and (r.json()["url"], r.json()["active"]) == ("http://erp.example.com/v2", True)
    assert org.delete(f"{API}/event-subscriptions/{sub['id']}").status_code == 204
    assert org.get(f"{API}/event-subscriptions/{sub['id']}").status_code == 404


def test_bad_input_is_refused_naming_the_field_and_nothing_is_stored(db, org):
    r = org.post(f"{API}/event-subscriptions", json={"url": "ftp://erp.example.com/in", "event_types": ["promise.created"]})
    assert r.status_code == 422 and error_fields(r) == {"url"}
    r = org.post(f"{API}/event-subscriptions", json={"url": "https://erp.example.com", "event_types": ["promise.created", "promise.maybe", "nope"]})
    assert r.status_code == 422 and error_fields(r) == {"event_types"}
    message = r.json()["error"]["fields"][0]["message"]
    assert "promise.maybe" in message and "nope" in message
    r = org.post(f"{API}/event-subscriptions", json={"url": "https://erp.example.com", "event_types": []})
    assert r.status_code == 422 and error_fields(r) == {"event_types"}
    r = org.post(f"{API}/event-subscriptions", json={"url": "not a url", "event_types": ["test.ping"]})
    assert r.status_code == 422 and error_fields(r) == {"url", "event_types"}
    r = org.post(f"{API}/event-subscriptions", json={"url": "https://erp.example.com", "event_types": ["promise.created"], "secret": "mine"})
    assert r.status_code == 422 and error_fields(r) == {"secret"}
    assert org.get(f"{API}/event-subscriptions").json()["items"] == []
    with db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(EventSubscription)) == 0
    # an update is checked the same way and changes nothing
    sub = subscribe(org, "https://erp.example.com", ["promise.created"])
    r = org.patch(f"{API}/event-subscriptions/{sub['id']}", json={"url": "javascript:alert(1)", "event_types": ["x.y"]})
    assert r.status_code == 422 and error_fields(r) == {"url", "event_types"}
    got = org.get(f"{API}/event-subscriptions/{sub['id']}").json()
    assert (got["url"], got["event_types"]) == ("https://erp.example.com", ["promise.created"])


# ---------------------------------------------------------------- emit and deliver


def test_payment_emits_and_the_delivery_is_signed(db, app, org, clock, receiver):
    sub = subscribe(org, receiver.url, ["payment.received", "account.resolved"])
    a = make_account(org)
    make_invoice(org, a["id"], "100.00")
    bad = org.post(f"{API}/payments", json={"account_id": a["id"], "amount": "-5"})
    assert bad.status_code == 422  # rolled back: no event either
    assert deliveries(org) == []
    pay = make_payment(org, a["id"], "100.00", reference="wire 7")
    queued = deliveries(org)
    # The account was never in collection (no case): its payment is news, its resolution is not.
    assert [d["event_type"] for d in queued] == ["payment.received"]
    assert all(d["status"] == "pending" and d["attempts"] == 0 for d in queued)

    assert deliver(db, app, clock) == {"claimed": 1, "delivered": 1}
    assert len(receiver.received) == 1
    by_type = {r.headers["x-duecourse-event"]: r for r in receiver.received}
    for rec in receiver.received:
        assert_signed(rec, sub["secret"], clock.now())
        assert rec.path == "/hooks/duecourse" and rec.headers["content-type"] == "application/json"
    paid = by_type["payment.received"].body
    assert paid["type"] == "payment.received" and paid["organization_id"] == org.id and paid["id"].startswith("evt_")
    assert paid["created_at"] == "2026-03-02T09:00:00Z"
    assert {
        k: paid["data"][k] for k in ("payment_id", "account_id", "account_external_id", "amount", "currency", "reference", "account_balance")
    } == {"payment_id": pay["id"], "account_id": a["id"], "account_external_id": a["external_id"], "amount": "100.00",
          "currency": "EUR", "reference": "wire 7", "account_balance": "0.00"}
    log = {d["event_type"]: d for d in deliveries(org)}
    assert str(log["payment.received"]["id"]) == by_type["payment.received"].headers["x-duecourse-delivery"]
    d = log["payment.received"]
    assert (d["status"], d["attempts"], d["last_status_code"], d["delivered_at"]) == ("delivered", 1, 200, "2026-03-02T09:00:00Z")
    assert [(e["attempt"], e["status_code"], e["error"]) for e in d["attempt_log"]] == [(1, 200, None)]
    assert d["payload"] == paid
    # nothing is due any more; a second payment on a resolved account is not a resolution
    assert deliver(db, app, clock) == {}
    make_payment(org, a["id"], "5.00")
    assert [d["event_type"] for d in deliveries(org, status="pending")] == ["payment.received"]


def test_an_account_in_collection_emits_account_resolved_once_however_its_balance_reaches_zero(db, app, org, clock):
    from datetime import date

    from tests.engine_helpers import debtor, refresh
    from tests.test_engine_dispatch import _setup
    from duecourse.engine.cycle import tick

    subscribe(org, "https://erp.example.com/in", ["account.resolved"])
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("email", "p", 5)])
    with db.transaction() as s:
        paid = debtor(s, org.id, now, "PAID", due=date(2026, 3, 1), total="80.00").id
        credited = debtor(s, org.id, now, "CREDITED", due=date(2026, 3, 1), total="60.00").id
        refresh(s, org.id, now)
    tick(db, now=now)  # both are in collection now: assigned, first email sent
    assert deliveries(org) == []
    make_payment(org, paid, "80.00")
    invoice = org.get(f"{API}/invoices?account_id={credited}").json()["items"][0]
    assert org.delete(f"{API}/invoices/{invoice['id']}").status_code == 204  # the invoice was cancelled
    resolved = [d for d in deliveries(org) if d["event_type"] == "account.resolved"]
    assert sorted(d["payload"]["data"]["account_id"] for d in resolved) == sorted([paid, credited])
    for d in resolved:
        data = d["payload"]["data"]
        assert (data["cause"], data["previous_status"], data["account_balance"]) == (
            "balance_zero", "in_auto_management", "0.00")
    # A second payment on the resolved account is not a second resolution.
    make_payment(org, paid, "5.00")
    assert len([d for d in deliveries(org) if d["event_type"] == "account.resolved"]) == 2


def test_promise_created_is_emitted_and_unsubscribed_types_are_not(db, app, org, other_org, clock, receiver):
    sub = subscribe(org, receiver.url, ["promise.created"])
    other = subscribe(other_org, receiver.url, ["promise.created", "payment.received"])
    a = make_account(org)
    make_invoice(org, a["id"], "300.00")
    make_payment(org, a["id"], "10.00")  # not subscribed by org: nothing
    assert deliveries(org) == []
    r = org.post(f"{API}/promises", json={"account_id": a["id"], "amount": "100.00", "promised_date": "2026-03-10"})
    assert r.status_code == 201, r.text
    assert [d["event_type"] for d in deliveries(org)] == ["promise.created"]
    assert deliveries(other_org) == []  # the other organization's subscription is untouched
    assert deliver(db, app, clock) == {"claimed": 1, "delivered": 1}
    (got,) = receiver.received
    assert_signed(got, sub["secret"], clock.now())
    with pytest.raises(Exception):  # noqa: B017 - the other organization's secret does not verify it
        webhooks.verify(other["secret"], got.raw, got.headers["x-duecourse-signature"], now=clock.now())
    data = got.body["data"]
    assert {k: data[k] for k in ("promise_id", "account_id", "amount", "currency", "promised_date", "status")} == {
        "promise_id": r.json()["id"], "account_id": a["id"], "amount": "100.00", "currency": "EUR",
        "promised_date": "2026-03-10", "status": "pending"}
    # a disabled subscription gets nothing
    org.patch(f"{API}/event-subscriptions/{sub['id']}", json={"active": False})
    org.post(f"{API}/promises", json={"account_id": a["id"], "amount": "50.00", "promised_date": "2026-03-11"})
    assert len(deliveries(org)) == 1
    with db.transaction() as s:
        assert events.emit(s, organization_id=org.id, type="promise.created", data={}, now=clock.now()) == 0


def test_promise_broken_and_kept_are_emitted_by_settlement(db, app, org, clock, receiver):
    subscribe(org, receiver.url, ["promise.broken", "promise.kept"])
    a = make_account(org)
    b = make_account(org)
    for acc in (a, b):
        make_invoice(org, acc["id"], "300.00")
        assert org.post(f"{API}/promises", json={"account_id": acc["id"], "amount": "100.00", "promised_date": "2026-03-03"}).status_code == 201
    make_payment(org, a["id"], "100.00", paid_on="2026-03-02")
    clock.advance(days=3)
    with db.transaction() as s:
        assert settle_promises(s, organization_id=org.id, now=clock.now()) == {"kept": 1, "broken": 1}
    got = {d["event_type"]: d["payload"]["data"] for d in deliveries(org)}
    assert got["promise.kept"]["account_id"] == a["id"] and got["promise.kept"]["paid_since_promise"] == "100.00"
    assert got["promise.broken"]["account_id"] == b["id"] and got["promise.broken"]["paid_since_promise"] == "0.00"
    assert deliver(db, app, clock) == {"claimed": 2, "delivered": 2}


def test_a_bounce_emits_message_bounced(db, app, org, clock, receiver):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("sms", "p", 5)])
    with db.transaction() as s:
        aid = debtor(s, org.id, now, "BOUNCE", due=date(2026, 3, 1)).id
        refresh(s, org.id, now)
    subscribe(org, receiver.url, ["message.bounced"])
    tick(db, now=now)
    with db.transaction() as s:
        item_id = s.scalar(select(QueueItem.id).where(QueueItem.account_id == aid, QueueItem.stage_index == 0))
    r = org.post(f"{API}/outcomes/delivery", role="manager", json={"queue_item_id": item_id, "status": "bounced", "error": "550 no such user"})
    assert r.status_code == 200, r.text
    (d,) = deliveries(org)
    assert d["event_type"] == "message.bounced"
    assert {k: d["payload"]["data"][k] for k in ("account_id", "queue_item_id", "channel", "status", "error")} == {
        "account_id": aid, "queue_item_id": item_id, "channel": "email", "status": "bounced", "error": "550 no such user"}


def test_a_failing_receiver_is_retried_with_back_off_then_given_up(db, app, org, clock, receiver):
    receiver.statuses = [500, 503, 200]
    subscribe(org, receiver.url, ["payment.received"])
    a = make_account(org)
    make_invoice(org, a["id"], "100.00")
    make_payment(org, a["id"], "10.00")
    t0 = clock.now()
    assert deliver(db, app, clock) == {"claimed": 1, "retrying": 1}
    (d,) = deliveries(org)
    assert (d["status"], d["attempts"], d["last_status_code"], d["last_error"]) == ("pending", 1, 500, "HTTP 500")
    assert d["next_attempt_at"] == (t0 + timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    assert d["attempt_log"][0]["response"] == "receiver is sad"
    clock.advance(seconds=59)
    assert deliver(db, app, clock) == {}  # not yet due
    clock.advance(seconds=1)
    assert deliver(db, app, clock) == {"claimed": 1, "retrying": 1}
    (d,) = deliveries(org)
    assert d["next_attempt_at"] == (clock.now() + timedelta(minutes=2)).isoformat().replace("+00:00", "Z")
    clock.advance(minutes=2)
    assert deliver(db, app, clock) == {"claimed": 1, "delivered": 1}
    (d,) = deliveries(org, status="delivered")
    assert [(e["attempt"], e["status_code"]) for e in d["attempt_log"]] == [(1, 500), (2, 503), (3, 200)]
    assert len({r.body["id"] for r in receiver.received}) == 1  # the same event each time

    # a receiver that never recovers: 8 attempts over 1+2+...+64 minutes, then failed
    receiver.statuses = [500]
    make_payment(org, a["id"], "10.00")
    waits = []
    for attempt in range(1, events.MAX_ATTEMPTS + 1):
        result = deliver(db, app, clock)
        assert result == ({"claimed": 1, "retrying": 1} if attempt < events.MAX_ATTEMPTS else {"claimed": 1, "failed": 1})
        (d,) = deliveries(org, status="pending" if attempt < events.MAX_ATTEMPTS else "failed")
        if attempt < events.MAX_ATTEMPTS:
            wait = datetime.fromisoformat(d["next_attempt_at"].replace("Z", "+00:00")) - clock.now()
            waits.append(int(wait.total_seconds() // 60))
            clock.advance(seconds=wait.total_seconds())
    assert waits == [1, 2, 4, 8, 16, 32, 64]
    assert (d["attempts"], d["next_attempt_at"], len(d["attempt_log"])) == (8, None, 8)
    clock.advance(days=1)
    assert deliver(db, app, clock) == {}


def test_a_receiver_that_is_down_is_retried_and_redelivery_works(db, app, org, other_org, clock, receiver):
    sub = subscribe(org, _closed_port_url(), ["payment.received"])
    a = make_account(org)
    make_invoice(org, a["id"], "100.00")
    make_payment(org, a["id"], "10.00")
    assert deliver(db, app, clock) == {"claimed": 1, "retrying": 1}
    (d,) = deliveries(org)
    assert d["status"] == "pending" and d["last_status_code"] is None and "Connect" in d["last_error"]
    # the receiver comes back at its new address; the retry goes there, signed with the current secret
    org.patch(f"{API}/event-subscriptions/{sub['id']}", json={"url": receiver.url})
    rotated = org.post(f"{API}/event-subscriptions/{sub['id']}/rotate-secret").json()["secret"]
    clock.advance(minutes=1)
    assert deliver(db, app, clock) == {"claimed": 1, "delivered": 1}
    assert_signed(receiver.received[0], rotated, clock.now())
    # manual redelivery: sent again on the next pass, with a fresh schedule
    assert other_org.post(f"{API}/event-deliveries/{d['id']}/redeliver").status_code == 404
    assert org.post(f"{API}/event-deliveries/{d['id']}/redeliver", role="viewer").status_code == 403
    r = org.post(f"{API}/event-deliveries/{d['id']}/redeliver")
    assert r.status_code == 200 and (r.json()["status"], r.json()["attempts"]) == ("pending", 0)
    clock.advance(minutes=5)
    assert deliver(db, app, clock) == {"claimed": 1, "delivered": 1}
    assert len(receiver.received) == 2 and receiver.received[0].raw == receiver.received[1].raw
    (d,) = deliveries(org)
    assert [e["attempt"] for e in d["attempt_log"]] == [1, 2, 1]


def test_test_ping_and_tenancy(db, app, org, other_org, clock, receiver):
    sub = subscribe(org, receiver.url, ["account.escalated"])
    r = org.post(f"{API}/event-subscriptions/{sub['id']}/test")
    assert r.status_code == 201 and r.json()["event_type"] == "test.ping" and r.json()["status"] == "pending"
    assert deliver(db, app, clock) == {"claimed": 1, "delivered": 1}
    (got,) = receiver.received
    assert got.headers["x-duecourse-event"] == "test.ping" and got.body["data"]["subscription_id"] == sub["id"]
    assert_signed(got, sub["secret"], clock.now())
    # another organization sees none of it
    sid, did = sub["id"], r.json()["id"]
    for method, url in [
        ("GET", f"{API}/event-subscriptions/{sid}"), ("PATCH", f"{API}/event-subscriptions/{sid}"),
        ("DELETE", f"{API}/event-subscriptions/{sid}"), ("POST", f"{API}/event-subscriptions/{sid}/rotate-secret"),
        ("POST", f"{API}/event-subscriptions/{sid}/test"), ("GET", f"{API}/event-deliveries/{did}"),
        ("POST", f"{API}/event-deliveries/{did}/redeliver"),
    ]:
        kw = {"json": {"active": False}} if method == "PATCH" else {}
        assert other_org.request(method, url, **kw).status_code == 404, (method, url)
    assert other_org.get(f"{API}/event-subscriptions").json()["items"] == []
    assert deliveries(other_org) == [] and deliveries(other_org, subscription_id=sid) == []
    assert org.get(f"{API}/event-subscriptions/{sid}").json()["active"] is True


def test_delivery_log_filters_and_pages(db, app, org, clock, receiver):
    s1 = subscribe(org, receiver.url, ["payment.received", "promise.created"])
    s2 = subscribe(org, _closed_port_url(), ["payment.received"])
    a = make_account(org)
    make_invoice(org, a["id"], "1000.00")
    for _ in range(3):
        make_payment(org, a["id"], "10.00")
    org.post(f"{API}/promises", json={"account_id": a["id"], "amount": "100.00", "promised_date": "2026-03-10"})
    deliver(db, app, clock)
    assert len(deliveries(org)) == 7
    assert len(deliveries(org, subscription_id=s1["id"])) == 4
    assert {d["status"] for d in deliveries(org, subscription_id=s2["id"])} == {"pending"}
    assert len(deliveries(org, status="delivered")) == 4
    assert [d["subscription_id"] for d in deliveries(org, type="promise.created")] == [s1["id"]]
    seen, cursor = [], None
    while True:
        page = org.get(f"{API}/event-deliveries", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(seen, reverse=True) and len(set(seen)) == 7
    assert org.get(f"{API}/event-deliveries", params={"status": "lost"}).status_code == 422
    # deleting a subscription drops its log
    org.delete(f"{API}/event-subscriptions/{s2['id']}")
    assert len(deliveries(org)) == 4


def test_a_lease_that_ran_out_is_claimed_again_and_a_lost_one_records_nothing(db, app, org, clock, receiver):
    subscribe(org, receiver.url, ["payment.received"])
    a = make_account(org)
    make_invoice(org, a["id"], "100.00")
    make_payment(org, a["id"], "10.00")
    with db.transaction() as s:  # a worker claims, then dies
        assert len(events.claim(s, now=clock.now(), worker="dead", limit=10, lease_seconds=300)) == 1
    assert deliver(db, app, clock) == {}  # leased
    clock.advance(seconds=301)
    assert deliver(db, app, clock) == {"claimed": 1, "delivered": 1}
    with db.transaction() as s:
        d = s.scalars(select(EventDelivery)).one()
        assert (d.status, d.attempts) == ("delivered", 2)
    # the dead worker comes back with its result: the delivery is no longer its lease, nothing changes
    job = events._Job(d.id, 1, "payment.received", receiver.url, "whsec_x", b"{}")
    with db.transaction() as s:
        assert events._record(s, job, events._Result(500, "HTTP 500", 3, None), now=clock.now(), worker="dead") == "lost"
    with db.transaction() as s:
        d = s.scalars(select(EventDelivery)).one()
        assert (d.status, d.last_status_code, len(d.attempt_log)) == ("delivered", 200, 1)


def test_an_escalation_stage_emits_account_escalated(db, app, org, clock, receiver):
    now = clock.now()
    _setup(db, org, now, [("escalation", "t", 0)])
    with db.transaction() as s:
        aid = debtor(s, org.id, now, "ESC", due=date(2026, 3, 1)).id
        refresh(s, org.id, now)
    subscribe(org, receiver.url, ["account.escalated"])
    tick(db, now=now)
    (d,) = deliveries(org)
    assert d["event_type"] == "account.escalated" and d["payload"]["data"]["account_id"] == aid
    assert deliver(db, app, clock) == {"claimed": 1, "delivered": 1}


def test_deliveries_of_a_subscription_disabled_later_fail_and_can_be_redelivered(db, app, org, clock, receiver):
    sub = subscribe(org, receiver.url, ["payment.received"])
    a = make_account(org)
    make_invoice(org, a["id"], "100.00")
    make_payment(org, a["id"], "10.00")
    org.patch(f"{API}/event-subscriptions/{sub['id']}", json={"active": False})
    assert deliver(db, app, clock) == {"claimed": 1, "failed": 1}
    assert receiver.received == []
    (d,) = deliveries(org)
    assert (d["status"], d["last_error"]) == ("failed", "the subscription is disabled")
    assert org.post(f"{API}/event-deliveries/{d['id']}/redeliver").status_code == 409
    assert org.post(f"{API}/event-subscriptions/{sub['id']}/test").status_code == 409
    org.patch(f"{API}/event-subscriptions/{sub['id']}", json={"active": True})
    assert org.post(f"{API}/event-deliveries/{d['id']}/redeliver").status_code == 200
    assert deliver(db, app, clock) == {"claimed": 1, "delivered": 1}
    assert len(receiver.received) == 1


def test_a_pass_is_bounded_in_time_and_waits_once_per_unreachable_url(db, app, org, clock, receiver):
    down = subscribe(org, _closed_port_url(), ["payment.received"])
    a = make_account(org)
    make_invoice(org, a["id"], "100.00")
    for _ in range(3):
        make_payment(org, a["id"], "10.00")
    # out of time before the first POST: everything goes back, untried and still due
    assert deliver(db, app, clock, budget_seconds=0) == {"claimed": 3, "released": 3}
    assert {(d["status"], d["attempts"], len(d["attempt_log"])) for d in deliveries(org)} == {("pending", 0, 0)}
    # one connection attempt per unreachable URL and pass; the others fail with its error
    assert deliver(db, app, clock) == {"claimed": 3, "retrying": 3}
    errors = sorted(d["last_error"] for d in deliveries(org))
    assert "Connect" in errors[0] and all(e.startswith("not attempted: ") and "Connect" in e for e in errors[1:])
    assert {d["attempts"] for d in deliveries(org)} == {1}
    # the receiver appears: all three go through on the next due pass
    org.patch(f"{API}/event-subscriptions/{down['id']}", json={"url": receiver.url})
    clock.advance(minutes=1)
    assert deliver(db, app, clock) == {"claimed": 3, "delivered": 3}
