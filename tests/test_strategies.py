"""Strategies (SPEC §3): validation, stages, activation, Run Now, delete rules, audit log, performance, access."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from duecourse.engine.models import Direction, Interaction, InteractionStatus
from duecourse.ledger.models import Account, AccountStatus
from duecourse.strategies.models import ActionType
from duecourse.strategies.service import next_run_at
from duecourse.tenancy.models import AuditEntry

API = "/api/v1"


def _fields(r) -> list[str]:  # type: ignore[no-untyped-def]
    return [f["field"] for f in r.json()["error"]["fields"]]


def _template(org, channel: str, name: str | None = None) -> int:  # type: ignore[no-untyped-def]
    body = {"name": name or f"{channel} template", "channel": channel, "body_text": "Hello {{ debtor_name }}"}
    if channel == "email":
        body["subject"] = "Your balance"
    r = org.post(f"{API}/templates", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _body(templates: dict[str, int] | None = None, **overrides):  # type: ignore[no-untyped-def]
    t = templates or {}
    body = {
        "name": "Standard dunning",
        "description": "Reminder, then firmer messages, then a call",
        "type": "standard",
        "multi_stage_handling": "run_all_in_order",
        "first_action_logic": "contextualized",
        "trigger_type": "days_overdue",
        "trigger_days": 5,
        "priority": 10,
        "automation_time": "08:30",
        "automation_days": ["mon", "wed", "fri"],
        "stages": [
            {
                "action_type": "email",
                "timing_type": "days_from_trigger",
                "days": -3,
                "template_id": t.get("email"),
            },
            {
                "action_type": "sms",
                "timing_type": "days_from_previous",
                "days": 4,
                "template_id": t.get("sms"),
                "tone": "firm",
            },
            {"action_type": "voice", "timing_type": "days_from_previous", "days": 7},
            {"action_type": "phone_call", "timing_type": "days_from_trigger", "days": 30},
        ],
    }
    body.update(overrides)
    return body


@pytest.fixture
def tpl(org):  # type: ignore[no-untyped-def]
    return {ch: _template(org, ch) for ch in ("email", "sms", "whatsapp", "voice")}


def _create(org, body):  # type: ignore[no-untyped-def]
    r = org.post(f"{API}/strategies", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def _audit(org, sid):  # type: ignore[no-untyped-def]
    r = org.get(f"{API}/strategies/{sid}/audit-log", params={"limit": 500})
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_create_and_read_with_stage_defaults_and_offsets(org, tpl):
    s = _create(org, _body(tpl, automation_days=["fri", "mon", "mon", "wed"]))
    assert s["name"] == "Standard dunning" and s["active"] is False and s["created_by"] == "api-key:admin key"
    assert s["automation_days"] == ["mon", "wed", "fri"]
    assert [st["position"] for st in s["stages"]] == [0, 1, 2, 3]
    assert [st["offset"] for st in s["stages"]] == [-3, 1, 8, 30]
    email, sms, voice, call = s["stages"]
    assert email["template_id"] == tpl["email"] and sms["tone"] == "firm" and email["tone"] == "standard"
    # voice (and whatsapp) get retry defaults; other channels have none.
    assert (voice["max_retries"], voice["retry_delay_hours"], voice["step_timeout_hours"]) == (2, 24, 24)
    assert (call["max_retries"], call["retry_delay_hours"], call["step_timeout_hours"]) == (None, None, None)
    assert org.get(f"{API}/strategies/{s['id']}", role="viewer").json() == s

    # Defaults of the optional top-level fields.
    minimal = _create(
        org,
        {
            "name": "Minimal",
            "description": "x",
            "trigger_type": "amount_threshold",
            "trigger_amount": "1500.10",
            "stages": [
                {"action_type": "whatsapp", "timing_type": "days_from_trigger", "days": 0, "max_retries": 0}
            ],
        },
    )
    assert (
        minimal["automation_days"] == ["mon", "tue", "wed", "thu", "fri"]
        and minimal["automation_time"] == "07:00"
    )
    assert minimal["type"] == "standard" and minimal["multi_stage_handling"] == "run_all_in_order"
    assert minimal["trigger_amount"] == "1500.10" and minimal["trigger_days"] is None
    assert (minimal["stages"][0]["max_retries"], minimal["stages"][0]["retry_delay_hours"]) == (0, 24)
    # Amounts may be JSON numbers; they are kept exactly.
    num = _create(
        org,
        {
            **_body(tpl, name="Numeric"),
            "trigger_type": "amount_threshold",
            "trigger_days": None,
            "trigger_amount": 0.1,
        },
    )
    assert num["trigger_amount"] == "0.10"
    precise = _create(
        org,
        {
            **_body(tpl, name="Precise"),
            "trigger_type": "amount_threshold",
            "trigger_days": None,
            "trigger_amount": "12.3456",
        },
    )
    assert precise["trigger_amount"] == "12.3456"


def _stage_change(i: int, **change):  # type: ignore[no-untyped-def]
    def apply(body):  # type: ignore[no-untyped-def]
        body["stages"][i].update(change)
        return body

    return apply


def _set(**change):  # type: ignore[no-untyped-def]
    def apply(body):  # type: ignore[no-untyped-def]
        body.update(change)
        return body

    return apply


def _drop(key):  # type: ignore[no-untyped-def]
    def apply(body):  # type: ignore[no-untyped-def]
        body.pop(key)
        return body

    return apply


def _foreign_template(other_org):  # type: ignore[no-untyped-def]
    return _template(other_org, "email", "theirs")


VALIDATION_CASES = [
    (_drop("name"), "name", None),
    (_set(name="  "), "name", None),
    (_set(name="n" * 201), "name", "200"),
    (_drop("description"), "description", None),
    (_set(description=" "), "description", None),
    (_set(description="d" * 1001), "description", "1000"),
    (_set(type="aggressive"), "type", None),
    (_set(multi_stage_handling="all"), "multi_stage_handling", None),
    (_set(first_action_logic="smart"), "first_action_logic", None),
    (_set(trigger_type="weekly"), "trigger_type", None),
    (_set(trigger_days=None), "trigger_days", "required when trigger_type is days_overdue"),
    (_set(trigger_days=-1), "trigger_days", None),
    (_set(trigger_days="5"), "trigger_days", None),
    (_set(trigger_days=2.5), "trigger_days", None),
    (_set(trigger_amount="100"), "trigger_amount", "only used when trigger_type is amount_threshold"),
    (
        _set(trigger_type="amount_threshold", trigger_days=None),
        "trigger_amount",
        "required when trigger_type is amount_threshold",
    ),
    (
        _set(trigger_type="amount_threshold", trigger_days=None, trigger_amount="0"),
        "trigger_amount",
        "greater than zero",
    ),
    (
        _set(trigger_type="amount_threshold", trigger_days=None, trigger_amount=-5),
        "trigger_amount",
        "negative",
    ),
    (_set(trigger_type="amount_threshold", trigger_days=None, trigger_amount="abc"), "trigger_amount", None),
    (
        _set(trigger_type="amount_threshold", trigger_days=None, trigger_amount="1.00001"),
        "trigger_amount",
        "decimal places",
    ),
    (_set(trigger_type="amount_threshold", trigger_days=None, trigger_amount=True), "trigger_amount", None),
    (
        _set(trigger_type="amount_threshold", trigger_days=3, trigger_amount="10"),
        "trigger_days",
        "only used when",
    ),
    (_set(priority="high"), "priority", None),
    (_set(priority=1.5), "priority", None),
    (_set(automation_time="24:00"), "automation_time", "HH:MM"),
    (_set(automation_time="7:00"), "automation_time", "HH:MM"),
    (_set(automation_time="12:60"), "automation_time", "HH:MM"),
    (_set(automation_days=[]), "automation_days", None),
    (_set(automation_days=["mon", "funday"]), "automation_days[1]", None),
    (_set(stages=[]), "stages", None),
    (_drop("stages"), "stages", None),
    (lambda b: {**b, "stages": [b["stages"][3]] * 11}, "stages", "10"),
    (_stage_change(0, timing_type="days_from_previous", days=0), "stages[0].timing_type", "first stage"),
    (_stage_change(2, days=-1), "stages[2].days", "0 or more"),
    (_stage_change(0, days=-366), "stages[0].days", None),
    (_stage_change(3, days=3651), "stages[3].days", None),
    (_stage_change(3, days="30"), "stages[3].days", None),
    (_stage_change(0, template_id=999999), "stages[0].template_id", "not found"),
    (_stage_change(0, action_type="fax"), "stages[0].action_type", None),
    (_stage_change(1, tone="angry"), "stages[1].tone", None),
    (_stage_change(2, max_retries=6), "stages[2].max_retries", None),
    (_stage_change(2, max_retries=-1), "stages[2].max_retries", None),
    (_stage_change(2, retry_delay_hours=0), "stages[2].retry_delay_hours", None),
    (_stage_change(2, step_timeout_hours=0), "stages[2].step_timeout_hours", None),
    (_stage_change(0, max_retries=1), "stages[0].max_retries", "only allowed on voice and whatsapp"),
    (
        _stage_change(1, retry_delay_hours=5),
        "stages[1].retry_delay_hours",
        "only allowed on voice and whatsapp",
    ),
    (
        _stage_change(3, step_timeout_hours=5),
        "stages[3].step_timeout_hours",
        "only allowed on voice and whatsapp",
    ),
    (_stage_change(3, color="red"), "stages[3].color", None),
    (_set(colour="red"), "colour", None),
    (_set(status="active"), "status", None),
]


def test_create_validation_names_the_field_and_creates_nothing(org, tpl):
    for apply, field, words in VALIDATION_CASES:
        body = apply(copy.deepcopy(_body(tpl)))
        r = org.post(f"{API}/strategies", json=body)
        assert r.status_code == 422, (field, r.text)
        assert field in _fields(r), (field, r.text)
        if words:
            assert words in r.json()["error"]["message"], (field, r.text)
    assert org.get(f"{API}/strategies").json()["items"] == []
    # Negative days_from_trigger are fine (a reminder before the trigger date), within bounds.
    ok = _create(org, _stage_change(0, days=-365)(_body(tpl)))
    assert ok["stages"][0]["days"] == -365


def test_templates_must_belong_to_the_organization_and_match_the_channel(org, other_org, tpl):
    foreign = _foreign_template(other_org)
    cases = [
        (_stage_change(0, template_id=foreign), "stages[0].template_id", "not found"),
        (
            _stage_change(0, template_id=tpl["sms"]),
            "stages[0].template_id",
            "is an sms template; an email stage needs an email template",
        ),
        (_stage_change(1, template_id=tpl["whatsapp"]), "stages[1].template_id", "sms stage"),
        (_stage_change(2, template_id=tpl["email"]), "stages[2].template_id", "voice stage"),
        (
            _stage_change(3, template_id=tpl["voice"]),
            "stages[3].template_id",
            "phone_call stages take no template",
        ),
    ]
    for apply, field, words in cases:
        r = org.post(f"{API}/strategies", json=apply(copy.deepcopy(_body(tpl))))
        assert r.status_code == 422 and _fields(r) == [field], r.text
        assert words in r.json()["error"]["message"]
    assert org.get(f"{API}/strategies").json()["items"] == []
    # Optional voice script: a voice template on a voice stage.
    s = _create(org, _stage_change(2, template_id=tpl["voice"])(_body(tpl)))
    assert s["stages"][2]["template_id"] == tpl["voice"]


def test_name_is_unique_per_organization(org, other_org, tpl):
    _create(org, _body(tpl))
    r = org.post(f"{API}/strategies", json=_body(tpl, name="STANDARD DUNNING"))
    assert r.status_code == 409 and _fields(r) == ["name"]
    assert len(org.get(f"{API}/strategies").json()["items"]) == 1
    other_tpl = {"email": _template(other_org, "email"), "sms": _template(other_org, "sms")}
    assert other_org.post(f"{API}/strategies", json=_body(other_tpl)).status_code == 201
    second = _create(org, _body(tpl, name="Second"))
    r = org.patch(f"{API}/strategies/{second['id']}", json={"name": "standard dunning"})
    assert r.status_code == 409 and _fields(r) == ["name"]
    r = org.put(f"{API}/strategies/{second['id']}", json=_body(tpl, name="Standard Dunning"))
    assert r.status_code == 409 and _fields(r) == ["name"]
    assert org.get(f"{API}/strategies/{second['id']}").json() == second


def test_activation_needs_a_template_on_every_messaging_stage(org, tpl):
    body = _body(tpl)
    body["stages"][0]["template_id"] = None
    body["stages"][1]["template_id"] = None
    body["stages"].append({"action_type": "whatsapp", "timing_type": "days_from_previous", "days": 1})
    # Created active: refused, naming each stage.
    r = org.post(f"{API}/strategies", json={**body, "active": True})
    assert r.status_code == 422
    assert _fields(r) == ["stages[0].template_id", "stages[1].template_id", "stages[4].template_id"]
    assert "cannot be activated" in r.json()["error"]["message"]
    assert org.get(f"{API}/strategies").json()["items"] == []

    # Saved inactive: fine. Activating by action or by PATCH is refused until the templates exist.
    s = _create(org, body)
    for r in (
        org.post(f"{API}/strategies/{s['id']}/activate"),
        org.patch(f"{API}/strategies/{s['id']}", json={"active": True}),
    ):
        assert r.status_code == 422, r.text
        assert _fields(r) == ["stages[0].template_id", "stages[1].template_id", "stages[4].template_id"]
    r = org.put(f"{API}/strategies/{s['id']}", json={**body, "active": True})
    assert r.status_code == 422 and "stages[4].template_id" in _fields(r)
    assert org.get(f"{API}/strategies/{s['id']}").json() == s

    body["stages"][0]["template_id"] = tpl["email"]
    body["stages"][1]["template_id"] = tpl["sms"]
    body["stages"][4]["template_id"] = tpl["whatsapp"]
    assert org.put(f"{API}/strategies/{s['id']}", json=body).json()["active"] is False
    act = org.post(f"{API}/strategies/{s['id']}/activate")
    assert act.status_code == 200 and act.json()["active"] is True
    # PUT without "active" keeps the strategy active.
    kept = org.put(f"{API}/strategies/{s['id']}", json={**body, "description": "still on"})
    assert kept.status_code == 200 and kept.json()["active"] is True
    # An active strategy cannot lose a messaging template.
    body["stages"][1]["template_id"] = None
    for r in (
        org.put(f"{API}/strategies/{s['id']}", json={**body, "active": True}),
        org.put(f"{API}/strategies/{s['id']}", json=body),
    ):
        assert r.status_code == 422 and _fields(r) == ["stages[1].template_id"]
    assert org.get(f"{API}/strategies/{s['id']}").json()["stages"][1]["template_id"] == tpl["sms"]
    deact = org.post(f"{API}/strategies/{s['id']}/deactivate")
    assert deact.status_code == 200 and deact.json()["active"] is False
    assert [e["action"] for e in _audit(org, s["id"])][:3] == ["deactivated", "updated", "activated"]
    # Unchanged: no new entry.
    n = len(_audit(org, s["id"]))
    assert org.post(f"{API}/strategies/{s['id']}/deactivate").status_code == 200
    assert len(_audit(org, s["id"])) == n


def test_put_replaces_and_reorders_stages_with_a_field_level_audit(org, tpl, clock):
    s = _create(org, _body(tpl))
    clock.advance(hours=2)
    body = _body(tpl, description="New description", priority=5)
    # Reordered: the sms stage moves first (and becomes days_from_trigger), the email stage second,
    # each keeping its own days; the voice stage is dropped; a whatsapp stage is added.
    body["stages"] = [
        {
            "action_type": "sms",
            "timing_type": "days_from_trigger",
            "days": 4,
            "template_id": tpl["sms"],
            "tone": "firm",
        },
        {"action_type": "email", "timing_type": "days_from_previous", "days": 3, "template_id": tpl["email"]},
        {"action_type": "phone_call", "timing_type": "days_from_trigger", "days": 30},
        {
            "action_type": "whatsapp",
            "timing_type": "days_from_previous",
            "days": 2,
            "template_id": tpl["whatsapp"],
            "max_retries": 4,
        },
        {"action_type": "place_on_stop", "timing_type": "days_from_previous", "days": 10},
    ]
    r = org.put(f"{API}/strategies/{s['id']}", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [(st["action_type"], st["days"], st["timing_type"]) for st in out["stages"]] == [
        ("sms", 4, "days_from_trigger"),
        ("email", 3, "days_from_previous"),
        ("phone_call", 30, "days_from_trigger"),
        ("whatsapp", 2, "days_from_previous"),
        ("place_on_stop", 10, "days_from_previous"),
    ]
    assert [st["offset"] for st in out["stages"]] == [4, 7, 30, 32, 42]
    assert out["stages"][3]["max_retries"] == 4 and out["stages"][3]["step_timeout_hours"] == 24
    assert out["updated_at"] != s["updated_at"] and out["updated_at"].startswith("2026-03-02T11:00")
    assert org.get(f"{API}/strategies/{s['id']}").json() == out

    log = _audit(org, s["id"])
    changes = {e["field"]: (e["old_value"], e["new_value"]) for e in log if e["action"] == "updated"}
    assert changes["description"] == ("Reminder, then firmer messages, then a call", "New description")
    assert changes["priority"] == ("10", "5")
    assert changes["stages[0].action_type"] == ("email", "sms")
    assert changes["stages[0].days"] == ("-3", "4")
    assert changes["stages[0].template_id"] == (str(tpl["email"]), str(tpl["sms"]))
    assert changes["stages[0].tone"] == ("standard", "firm")
    assert changes["stages[1].days"] == ("4", "3")
    assert changes["stages[2].action_type"] == ("voice", "phone_call")
    assert changes["stages[2].max_retries"] == ("2", None)
    assert changes["stages[2].timing_type"] == ("days_from_previous", "days_from_trigger")
    assert changes["stages[3].days"] == ("30", "2") and changes["stages[3].max_retries"] == (None, "4")
    # Unchanged fields get no entry.
    assert not {"stages[0].timing_type", "stages[1].timing_type", "stages[3].tone", "stages[0].note"} & set(
        changes
    )
    added = [e for e in log if e["action"] == "stage_added"]
    assert [e["field"] for e in added] == ["stages[4]"]
    assert '"place_on_stop"' in added[0]["new_value"]
    assert "name" not in changes and "trigger_days" not in changes
    assert all(
        e["actor"] == "api-key:admin key" and e["at"].startswith("2026-03-02T11:00")
        for e in log
        if e["action"] != "created"
    )

    # Shrinking the list records removed stages with their old values.
    body["stages"] = body["stages"][:2]
    assert org.put(f"{API}/strategies/{s['id']}", json=body).status_code == 200
    removed = [e for e in _audit(org, s["id"]) if e["action"] == "stage_removed"]
    assert [e["field"] for e in removed] == ["stages[4]", "stages[3]", "stages[2]"]  # newest first
    assert '"whatsapp"' in removed[1]["old_value"] and removed[1]["new_value"] is None
    assert len(org.get(f"{API}/strategies/{s['id']}").json()["stages"]) == 2


def test_patch_top_level_fields(org, tpl, clock):
    s = _create(org, _body(tpl))
    sid = s["id"]
    bad = [
        ({"name": None}, "name"),
        ({"description": None}, "description"),
        ({"active": None}, "active"),
        ({"trigger_days": None}, "trigger_days"),
        ({"trigger_type": "amount_threshold"}, "trigger_amount"),
        ({"trigger_amount": "10"}, "trigger_amount"),
        ({"automation_days": []}, "automation_days"),
        ({"automation_time": "25:00"}, "automation_time"),
        ({"priority": "first"}, "priority"),
        ({"stages": []}, "stages"),
        ({"type": "mega"}, "type"),
    ]
    for change, field in bad:
        r = org.patch(f"{API}/strategies/{sid}", json=change)
        assert r.status_code == 422 and field in _fields(r), (change, r.text)
    assert org.get(f"{API}/strategies/{sid}").json() == s
    assert _audit(org, sid)[0]["action"] == "created" and len(_audit(org, sid)) == 1

    clock.advance(minutes=5)
    r = org.patch(
        f"{API}/strategies/{sid}",
        json={
            "trigger_type": "amount_threshold",
            "trigger_amount": "250.5",
            "automation_days": ["sun", "sat"],
        },
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["trigger_type"], out["trigger_amount"], out["trigger_days"]) == (
        "amount_threshold",
        "250.50",
        None,
    )
    assert out["automation_days"] == ["sat", "sun"] and out["stages"] == s["stages"]
    entries = {e["field"]: e for e in _audit(org, sid) if e["action"] == "updated"}
    assert (entries["trigger_type"]["old_value"], entries["trigger_type"]["new_value"]) == (
        "days_overdue",
        "amount_threshold",
    )
    assert (entries["trigger_days"]["old_value"], entries["trigger_days"]["new_value"]) == ("5", None)
    assert (entries["trigger_amount"]["old_value"], entries["trigger_amount"]["new_value"]) == (
        None,
        "250.5000",
    )
    assert entries["automation_days"]["old_value"] == '["mon", "wed", "fri"]'
    assert entries["automation_days"]["new_value"] == '["sat", "sun"]'
    # The same value again records nothing.
    n = len(_audit(org, sid))
    assert org.patch(f"{API}/strategies/{sid}", json={"trigger_amount": 250.5}).status_code == 200
    assert len(_audit(org, sid)) == n
    back = org.patch(f"{API}/strategies/{sid}", json={"trigger_type": "days_overdue", "trigger_days": 0})
    assert (
        back.status_code == 200 and back.json()["trigger_amount"] is None and back.json()["trigger_days"] == 0
    )


def test_audit_log_names_the_user_and_pages_newest_first(org, tpl, client, clock):
    s = _create(org, _body(tpl))
    sid = s["id"]
    login = client.post(f"{API}/auth/login", json={"email": org.admin_email, "password": org.admin_password})
    assert login.status_code == 200
    user_id = login.json()["id"]
    clock.advance(minutes=1)
    assert client.patch(f"{API}/strategies/{sid}", json={"priority": 1, "name": "Renamed"}).status_code == 200
    client.cookies.clear()

    log = _audit(org, sid)
    assert [(e["action"], e["field"]) for e in log] == [
        ("updated", "priority"),
        ("updated", "name"),
        ("created", None),
    ]
    name, created = log[1], log[2]
    assert (name["old_value"], name["new_value"]) == ("Standard dunning", "Renamed")
    assert (name["user_id"], name["api_key_id"], name["actor"]) == (user_id, None, org.admin_email)
    assert (
        name["at"].startswith("2026-03-02T09:01")
        and name["entity_type"] == "strategy"
        and name["entity_id"] == sid
    )
    assert (
        created["user_id"] is None
        and created["api_key_id"] is not None
        and created["actor"] == "api-key:admin key"
    )

    page = org.get(f"{API}/strategies/{sid}/audit-log", params={"limit": 2}).json()
    assert [e["id"] for e in page["items"]] == [log[0]["id"], log[1]["id"]] and page["next_cursor"]
    rest = org.get(
        f"{API}/strategies/{sid}/audit-log", params={"limit": 2, "cursor": page["next_cursor"]}
    ).json()
    assert [e["id"] for e in rest["items"]] == [log[2]["id"]] and rest["next_cursor"] is None


def _accounts(db, org_id, clock, strategy_id, rows):  # type: ignore[no-untyped-def]
    """rows: (status, days the case has been open or None, case_next_stage)."""
    now = clock.now()
    with db.transaction() as s:
        for i, (status, days_open, stage) in enumerate(rows):
            s.add(
                Account(
                    organization_id=org_id,
                    external_id=f"A{strategy_id}-{i}",
                    name=f"Debtor {i}",
                    currency="EUR",
                    created_at=now,
                    updated_at=now,
                    status=status,
                    strategy_id=strategy_id,
                    case_next_stage=stage,
                    case_opened_at=None if days_open is None else now - timedelta(days=days_open),
                    balance=Decimal(100),
                    gross_open=Decimal(100),
                )
            )


def test_delete_only_inactive_without_open_cases_and_the_audit_log_survives(org, tpl, db, clock):
    s = _create(org, _body(tpl, active=True))
    sid = s["id"]
    r = org.delete(f"{API}/strategies/{sid}")
    assert r.status_code == 409 and "deactivate" in r.json()["error"]["message"]
    assert org.post(f"{API}/strategies/{sid}/deactivate").status_code == 200
    _accounts(
        db, org.id, clock, sid, [(AccountStatus.in_auto_management, 3, 1), (AccountStatus.resolved, 9, None)]
    )
    r = org.delete(f"{API}/strategies/{sid}")
    assert r.status_code == 409 and "1 open case" in r.json()["error"]["message"]
    assert org.get(f"{API}/strategies/{sid}").status_code == 200

    with db.transaction() as session:
        for a in session.scalars(select(Account).where(Account.strategy_id == sid)):
            a.status = AccountStatus.resolved
    c = org.post(f"{API}/campaigns", json={"name": "Spring", "strategy_id": sid})
    assert c.status_code == 201
    agent = org.post(f"{API}/users", json={"email": "caller@example.com", "password": "longenough", "role": "agent"})
    assert agent.status_code == 201
    # An interaction names the strategy, the campaign and the agent without foreign keys: deleting
    # each of them clears its reference, as ON DELETE SET NULL would.
    with db.transaction() as session:
        account_id = session.scalars(select(Account.id).where(Account.strategy_id == sid)).first()
        session.add(Interaction(organization_id=org.id, account_id=account_id, strategy_id=sid,
                                campaign_id=c.json()["id"], user_id=agent.json()["id"], channel="phone_call",
                                direction="outbound", status="completed", is_manual=True,
                                occurred_at=clock.now(), created_at=clock.now()))

    def refs() -> tuple[int | None, int | None, int | None]:
        with db.transaction() as session:
            i = session.scalars(select(Interaction)).one()
            return i.strategy_id, i.campaign_id, i.user_id

    r = org.delete(f"{API}/strategies/{sid}")
    assert r.status_code == 409 and "'Spring'" in r.json()["error"]["message"]
    assert refs() == (sid, c.json()["id"], agent.json()["id"])
    assert org.delete(f"{API}/campaigns/{c.json()['id']}").status_code == 204
    assert refs() == (sid, None, agent.json()["id"])
    assert org.delete(f"{API}/users/{agent.json()['id']}").status_code == 204
    assert refs() == (sid, None, None)

    assert org.delete(f"{API}/strategies/{sid}").status_code == 204
    assert refs() == (None, None, None)
    assert org.get(f"{API}/strategies/{sid}").status_code == 404
    assert org.delete(f"{API}/strategies/{sid}").status_code == 404
    log = _audit(org, sid)
    assert [e["action"] for e in log] == ["deleted", "deactivated", "created"]
    assert '"Standard dunning"' in log[0]["old_value"]
    with db.transaction() as session:
        assert (
            session.scalar(
                select(func.count())
                .select_from(AuditEntry)
                .where(AuditEntry.entity_type == "strategy", AuditEntry.entity_id == sid)
            )
            == 3
        )
        # Resolved accounts simply lose the deleted strategy.
        assert session.scalars(select(Account.strategy_id)).all() == [None, None]


def test_run_now_only_for_active_strategies(org, tpl, db):
    s = _create(org, _body(tpl))
    sid = s["id"]
    r = org.post(f"{API}/strategies/{sid}/run")
    assert r.status_code == 409 and "active" in r.json()["error"]["message"]
    assert org.get(f"{API}/strategies/{sid}").json()["last_run_at"] is None
    assert org.post(f"{API}/strategies/{sid}/activate").status_code == 200
    for role in ("viewer", "agent"):
        assert org.post(f"{API}/strategies/{sid}/run", role=role).status_code == 403
    r = org.post(f"{API}/strategies/{sid}/run", role="manager")
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["strategy_id"] == sid and {"assigned", "enqueued"} <= set(result)
    assert org.get(f"{API}/strategies/{sid}").json()["last_run_at"] is not None
    entry = _audit(org, sid)[0]
    assert (
        entry["action"] == "run"
        and entry["actor"] == "api-key:manager key"
        and f'"strategy_id": {sid}' in entry["new_value"]
    )


def test_list_search_filters_case_stats_and_cursor(org, tpl, db, clock):
    a = _create(org, _body(tpl, name="Gentle VIP", type="vip", active=True))
    b = _create(org, _body(tpl, name="Hard line", type="high_risk"))
    c = _create(org, _body(tpl, name="vip_backup", type="vip"))
    _accounts(
        db,
        org.id,
        clock,
        a["id"],
        [
            (AccountStatus.in_auto_management, 2, 0),
            (AccountStatus.pending_contact, 4, None),
            (AccountStatus.resolved, 50, None),
        ],
    )
    _accounts(db, org.id, clock, b["id"], [(AccountStatus.sequence_completed, 10, None)])

    def ids(**params):  # type: ignore[no-untyped-def]
        r = org.get(f"{API}/strategies", role="viewer", params=params)
        assert r.status_code == 200, r.text
        return [x["id"] for x in r.json()["items"]]

    assert ids() == [a["id"], b["id"], c["id"]]
    assert ids(search="VIP") == [a["id"], c["id"]]
    assert ids(search="_") == [c["id"]]  # LIKE wildcards are literal
    assert ids(type="high_risk") == [b["id"]]
    assert ids(active="true") == [a["id"]]
    assert ids(active="false", type="vip") == [c["id"]]
    assert org.get(f"{API}/strategies", params={"type": "boring"}).status_code == 422

    items = {x["id"]: x for x in org.get(f"{API}/strategies").json()["items"]}
    assert (items[a["id"]]["open_cases"], items[a["id"]]["avg_days_open"]) == (2, 3.0)
    assert (items[b["id"]]["open_cases"], items[b["id"]]["avg_days_open"]) == (1, 10.0)
    assert (items[c["id"]]["open_cases"], items[c["id"]]["avg_days_open"]) == (0, None)

    first = org.get(f"{API}/strategies", params={"limit": 2}).json()
    assert [x["id"] for x in first["items"]] == [a["id"], b["id"]] and first["next_cursor"]
    rest = org.get(f"{API}/strategies", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [x["id"] for x in rest["items"]] == [c["id"]] and rest["next_cursor"] is None
    assert org.get(f"{API}/strategies", params={"cursor": "garbage"}).status_code == 422


def test_performance(org, tpl, db, clock):
    s = _create(org, _body(tpl, active=True))
    other = _create(org, _body(tpl, name="Other"))
    sid = s["id"]
    _accounts(
        db,
        org.id,
        clock,
        sid,
        [
            (AccountStatus.in_auto_management, 1, 0),
            (AccountStatus.in_auto_management, 2, 1),
            (AccountStatus.promise_pending, 3, 1),
            (AccountStatus.sequence_completed, 30, 4),
            (AccountStatus.resolved, 100, None),
        ],
    )
    now = clock.now()
    with db.transaction() as session:
        acc = session.scalars(
            select(Account.id).where(Account.strategy_id == sid).order_by(Account.id)
        ).first()

        def interaction(days_ago, channel=ActionType.email, direction=Direction.outbound, strategy_id=sid):  # type: ignore[no-untyped-def]
            session.add(
                Interaction(
                    organization_id=org.id,
                    account_id=acc,
                    strategy_id=strategy_id,
                    channel=channel,
                    direction=direction,
                    status=InteractionStatus.sent,
                    occurred_at=now - timedelta(days=days_ago),
                    created_at=now,
                )
            )

        interaction(0)
        interaction(13.9)
        interaction(14)  # exactly 14 days ago counts
        interaction(14.01)  # older: not counted
        interaction(1, channel=ActionType.sms)
        interaction(1, direction=Direction.inbound)
        interaction(1, strategy_id=other["id"])

    p = org.get(f"{API}/strategies/{sid}/performance", role="viewer").json()
    assert p["open_cases"] == 4
    assert p["avg_days_open"] == 9.0  # (1 + 2 + 3 + 30) / 4
    assert p["emails_sent_14d"] == 3
    assert p["created_by"] == "api-key:admin key" and p["active"] is True and p["last_run_at"] is None
    assert [(f["position"], f["action_type"], f["count"]) for f in p["funnel"]] == [
        (0, "email", 1),
        (1, "sms", 2),
        (2, "voice", 0),
        (3, "phone_call", 0),
    ]
    assert p["sequence_completed"] == 1
    assert p["warnings"] == []
    # Monday 2026-03-02 09:00 UTC = 10:00 in Madrid; automation 08:30 on mon/wed/fri -> Wednesday 08:30 Madrid.
    assert p["next_run_at"].startswith("2026-03-04T07:30:00")

    other_p = org.get(f"{API}/strategies/{other['id']}/performance").json()
    assert other_p["open_cases"] == 0 and other_p["avg_days_open"] is None and other_p["next_run_at"] is None
    assert other_p["emails_sent_14d"] == 1
    assert len(other_p["warnings"]) == 1 and "inactive" in other_p["warnings"][0]

    clock.advance(days=20)
    quiet = org.get(f"{API}/strategies/{sid}/performance").json()
    assert quiet["emails_sent_14d"] == 0
    assert quiet["warnings"] == ["4 open cases but no emails sent in the last 14 days"]
    assert quiet["avg_days_open"] == 29.0


def test_next_run_at_uses_the_organization_time_zone():
    mon_9utc = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    # Later the same day in Madrid (UTC+1 in winter).
    assert next_run_at(
        now=mon_9utc, automation_time="18:00", automation_days=["mon"], timezone="Europe/Madrid"
    ) == datetime(2026, 3, 2, 17, 0, tzinfo=UTC)
    # Already past today: next week's Monday.
    assert next_run_at(
        now=mon_9utc, automation_time="07:00", automation_days=["mon"], timezone="Europe/Madrid"
    ) == datetime(2026, 3, 9, 6, 0, tzinfo=UTC)
    # Across the DST change (2026-03-29 in Europe): 07:00 local becomes 05:00 UTC.
    assert next_run_at(
        now=datetime(2026, 3, 28, 12, 0, tzinfo=UTC),
        automation_time="07:00",
        automation_days=["mon"],
        timezone="Europe/Madrid",
    ) == datetime(2026, 3, 30, 5, 0, tzinfo=UTC)
    # A zone ahead of UTC where it is already Tuesday.
    assert next_run_at(
        now=datetime(2026, 3, 2, 23, 0, tzinfo=UTC),
        automation_time="07:00",
        automation_days=["tue"],
        timezone="Asia/Tokyo",
    ) == datetime(2026, 3, 9, 22, 0, tzinfo=UTC)


@pytest.mark.parametrize("role", ["viewer", "agent", "manager"])
def test_only_admins_change_strategies(org, tpl, role):
    s = _create(org, _body(tpl))
    sid = s["id"]
    calls = [
        org.post(f"{API}/strategies", role=role, json=_body(tpl, name="Mine")),
        org.put(f"{API}/strategies/{sid}", role=role, json=_body(tpl, name="Mine")),
        org.patch(f"{API}/strategies/{sid}", role=role, json={"name": "Mine"}),
        org.post(f"{API}/strategies/{sid}/activate", role=role),
        org.post(f"{API}/strategies/{sid}/deactivate", role=role),
        org.delete(f"{API}/strategies/{sid}", role=role),
    ]
    assert [r.status_code for r in calls] == [403] * len(calls)
    assert org.get(f"{API}/strategies/{sid}", role=role).json() == s
    assert [x["id"] for x in org.get(f"{API}/strategies", role=role).json()["items"]] == [sid]
    assert org.get(f"{API}/strategies/{sid}/performance", role=role).status_code == 200
    assert len(org.get(f"{API}/strategies/{sid}/audit-log", role=role).json()["items"]) == 1


def test_other_organizations_strategies_are_404(org, other_org, tpl):
    s = _create(org, _body(tpl, active=True))
    sid = s["id"]
    other_tpl = {"email": _template(other_org, "email"), "sms": _template(other_org, "sms")}
    calls = [
        other_org.get(f"{API}/strategies/{sid}"),
        other_org.put(f"{API}/strategies/{sid}", json=_body(other_tpl)),
        other_org.patch(f"{API}/strategies/{sid}", json={"name": "Taken"}),
        other_org.delete(f"{API}/strategies/{sid}"),
        other_org.post(f"{API}/strategies/{sid}/activate"),
        other_org.post(f"{API}/strategies/{sid}/deactivate"),
        other_org.post(f"{API}/strategies/{sid}/run"),
        other_org.get(f"{API}/strategies/{sid}/audit-log"),
        other_org.get(f"{API}/strategies/{sid}/performance"),
    ]
    assert [r.status_code for r in calls] == [404] * len(calls)
    assert all(r.json()["error"]["code"] == "not_found" for r in calls)
    assert other_org.get(f"{API}/strategies").json()["items"] == []
    assert org.get(f"{API}/strategies/{sid}").json() == s
    assert len(_audit(org, sid)) == 1
    assert org.get(f"{API}/strategies/999999/audit-log").status_code == 404
