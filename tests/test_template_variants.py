"""Tone variants of templates (SPEC §7 "per channel and tone", §4.8 adaptive timing): a stage names
its base template; an item whose tone differs is sent the base's variant with that tone."""

from __future__ import annotations

from datetime import date

from sqlalchemy import select

from duecourse.channels.models import SandboxMessage
from duecourse.engine.cycle import tick
from duecourse.engine.models import QueueItem
from duecourse.strategies.models import Stage
from tests.engine_helpers import debtor, refresh
from tests.test_engine_dispatch import _setup

API = "/api/v1/templates"
BASE = {"name": "Reminder", "channel": "email", "tone": "standard", "subject": "Invoice {{ carrying_invoice_number }}",
        "body_text": "Pay {{ balance }} {{ currency }} now, {{ debtor_name }}."}
SOFT = {**BASE, "name": "Reminder (empathetic)", "tone": "empathetic",
        "body_text": "We understand times are hard, {{ debtor_name }}. Can we help with {{ balance }} {{ currency }}?"}


def _fields(r):  # type: ignore[no-untyped-def]
    return [f["field"] for f in r.json()["error"]["fields"]]


def test_variant_rules_are_checked_at_save(org, other_org):
    base = org.post(API, json=BASE).json()
    soft = org.post(API, json={**SOFT, "variant_of_id": base["id"]})
    assert soft.status_code == 201 and soft.json()["variant_of_id"] == base["id"]
    bad = [
        ({**SOFT, "name": "x1", "variant_of_id": 999999}, "not found"),
        ({**SOFT, "name": "x2", "tone": "standard", "variant_of_id": base["id"]}, "already has the standard tone"),
        ({**SOFT, "name": "x3", "variant_of_id": base["id"]}, "already the empathetic variant"),
        ({**SOFT, "name": "x4", "tone": "firm", "variant_of_id": soft.json()["id"]}, "is itself a variant"),
        ({"name": "x5", "channel": "sms", "tone": "firm", "body_text": "hi", "variant_of_id": base["id"]}, "is for email"),
    ]
    for body, message in bad:
        r = org.post(API, json=body)
        assert r.status_code == 422 and _fields(r) == ["variant_of_id"] and message in r.text, (body, r.text)
    # Another organization's template is not found either.
    r = other_org.post(API, json={**SOFT, "variant_of_id": base["id"]})
    assert r.status_code == 422 and "not found" in r.text
    names = [t["name"] for t in org.get(API).json()["items"]]
    assert names == ["Reminder", "Reminder (empathetic)"]  # nothing else was created
    # The base cannot be deleted or change channel while it has variants; the variant can be detached.
    assert org.delete(f"{API}/{base['id']}").status_code == 409
    r = org.patch(f"{API}/{base['id']}", json={"channel": "sms", "subject": None})
    assert r.status_code == 409
    assert org.patch(f"{API}/{soft.json()['id']}", json={"variant_of_id": None}).json()["variant_of_id"] is None
    assert org.delete(f"{API}/{base['id']}").status_code == 204


def test_an_empathetic_item_gets_the_empathetic_variant(db, org, clock):
    now = clock.now()
    sid = _setup(db, org, now, [("voice", "t", 0), ("email", "p", 2)])
    base = org.post(API, json=BASE).json()
    org.post(API, json={**SOFT, "variant_of_id": base["id"]})
    with db.transaction() as s:
        s.scalars(select(Stage).where(Stage.strategy_id == sid, Stage.position == 1)).one().template_id = base["id"]
        calm = debtor(s, org.id, now, "CALM", due=date(2026, 3, 1)).id
        upset = debtor(s, org.id, now, "UPSET", due=date(2026, 3, 1), phone="+34600111333").id
        refresh(s, org.id, now)
    tick(db, now=now)
    with db.transaction() as s:
        calls = {q.account_id: q.id for q in s.scalars(select(QueueItem).where(QueueItem.stage_index == 0))}
    org.post("/api/v1/outcomes/call", role="manager",
             json={"queue_item_id": calls[calm], "outcome": "refused", "sentiment": "neutral", "willingness": 3})
    org.post("/api/v1/outcomes/call", role="manager",
             json={"queue_item_id": calls[upset], "outcome": "refused", "sentiment": "hostile", "willingness": 1})
    clock.advance(days=2)
    tick(db, now=clock.now())
    with db.transaction() as s:
        sent = {m.account_id: m.body_text for m in s.scalars(select(SandboxMessage).where(SandboxMessage.channel == "email"))}
    assert sent[calm] == "Pay 100.00 EUR now, CALM."
    assert upset not in sent  # the hostile call doubled the delay (adaptive timing)
    clock.advance(days=2)
    tick(db, now=clock.now())
    with db.transaction() as s:
        sent = {m.account_id: (m.body_text, m.tone) for m in s.scalars(select(SandboxMessage).where(SandboxMessage.channel == "email"))}
    assert sent[upset] == ("We understand times are hard, UPSET. Can we help with 100.00 EUR?", "empathetic")
