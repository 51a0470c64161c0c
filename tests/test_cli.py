"""The command line: init, migrate and the embedded demo, against both databases."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from duecourse.cli import app
from duecourse.config import get_settings
from duecourse.engine.models import QueueItem
from duecourse.ledger.models import Account
from duecourse.tenancy.models import ApiKey, Organization, User
from duecourse.tenancy.security import hash_api_key


@pytest.fixture
def cli(db, monkeypatch):
    monkeypatch.setenv("DUECOURSE_DATABASE_URL", db.url)
    # tick (like serve, worker and scheduler) refuses to run on PostgreSQL without a proper key.
    monkeypatch.setenv("DUECOURSE_SECRET_KEY", "cli-test-secret-key-of-at-least-32-characters")
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_migrate_is_idempotent(cli):
    for _ in range(2):
        r = cli.invoke(app, ["migrate"])
        assert r.exit_code == 0, r.output
        assert "up to date" in r.output


def test_init_creates_org_admin_and_working_key(cli, db, client):
    r = cli.invoke(
        app,
        ["init", "--organization", "Acme", "--email", "Boss@Acme.example", "--password", "s3cret-pass",
         "--timezone", "America/New_York", "--currency", "usd"],
    )
    assert r.exit_code == 0, r.output
    key = r.output.strip().splitlines()[-1]
    with db.transaction() as s:
        org = s.scalar(select(Organization).where(Organization.name == "Acme"))
        assert (org.timezone, org.base_currency) == ("America/New_York", "USD")
        assert s.scalar(select(User.role).where(User.email == "boss@acme.example")) == "admin"
        assert s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key))).organization_id == org.id
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {key}"})
    assert me.status_code == 200 and me.json()["organization"]["name"] == "Acme"


def test_init_refuses_bad_input_and_changes_nothing(cli, db):
    r = cli.invoke(app, ["init", "-o", "X", "--email", "a@b.example", "--password", "long-enough", "--timezone", "Mars/Base"])
    assert r.exit_code == 2 and "Mars/Base" in r.output
    r = cli.invoke(app, ["init", "-o", "X", "--email", "a@b.example", "--password", "long-enough", "--currency", "XYZ"])
    assert r.exit_code == 2 and "XYZ" in r.output
    with db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(Organization)) == 0


def test_demo_loads_once(cli, db):
    for _ in range(2):
        r = cli.invoke(app, ["demo", "--no-serve"])
        assert r.exit_code == 0, r.output
        assert "duecourse-demo" in r.output
    with db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(Organization)) == 1
        accounts = s.scalars(select(Account)).all()
        assert len(accounts) == 60
        # Derived values were computed and Run Now assigned the overdue accounts outside the campaign.
        assert all(a.balance > 0 for a in accounts if a.collection_tab is not None)
        assert {a.status for a in accounts if a.campaign_id is None} <= {"pending_contact", "unassigned", "resolved"}
        assert any(a.status == "pending_contact" for a in accounts)


def test_tick_at_runs_a_cycle_and_refuses_bad_time(cli, db):
    assert cli.invoke(app, ["demo", "--no-serve"]).exit_code == 0
    bad = cli.invoke(app, ["tick", "--at", "yesterday"])
    assert bad.exit_code == 2 and "yesterday" in bad.output
    # A weekday morning in 2030: every demo strategy's run is due, every stage too, and the cycle
    # dispatches what they enqueue (the latest stage, for the skip_to_latest strategy).
    with db.transaction() as s:
        before = s.scalar(select(func.count()).select_from(QueueItem).where(QueueItem.status == "completed"))
    r = cli.invoke(app, ["tick", "--at", "2030-01-07T09:30:00Z"])
    assert r.exit_code == 0, r.output
    with db.transaction() as s:
        after = s.scalar(select(func.count()).select_from(QueueItem).where(QueueItem.status == "completed"))
    assert after > before and f"'dispatched': {after - before}" in " ".join(r.output.split())
    again = cli.invoke(app, ["tick", "--at", "2030-01-07T09:30:00Z"])
    assert "'strategy_runs': 0" in again.output  # the same slot never runs twice


def test_simulate_prints_the_plan_and_changes_nothing(cli, db):
    assert cli.invoke(app, ["demo", "--no-serve"]).exit_code == 0
    from duecourse.engine.models import QueueItem

    with db.transaction() as s:
        before = s.scalar(select(func.count()).select_from(QueueItem))
        org_id = s.scalar(select(Organization.id))
    assert cli.invoke(app, ["simulate", "-o", str(org_id), "--days", "40"]).exit_code == 2
    r = cli.invoke(app, ["simulate", "-o", str(org_id), "--days", "2"])
    assert r.exit_code == 0, r.output
    assert "summary:" in r.output and "DEMO-" in r.output
    with db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(QueueItem)) == before


def test_demo_firm_notice_never_says_negative_days_overdue(cli, db):
    """The demo's high-balance strategy reaches debtors whose invoice is not due yet: its notice
    says when the invoice falls due instead of "-25 days overdue"."""
    from duecourse.messaging import rendering
    from duecourse.messaging.models import Template

    assert cli.invoke(app, ["demo", "--no-serve"]).exit_code == 0
    with db.transaction() as s:
        firm = s.scalar(select(Template).where(Template.name == "Firm notice"))
        body, subject = firm.body_text, firm.subject
    context = {**rendering.SAMPLE_CONTEXT, "carrying_invoice_due_date": "2026-12-17"}
    not_due = rendering.render(body, {**context, "days_overdue": -25}, field="body_text")
    assert "falls due on 2026-12-17" in not_due and "overdue" not in not_due
    assert "is 12 days overdue" in rendering.render(body, {**context, "days_overdue": 12}, field="body_text")
    assert "overdue" not in rendering.render(subject, context, field="subject")


def test_engine_processes_freeze_their_start_up_heap_and_collect_less_often():
    """What ``duecourse serve``, ``worker`` and ``scheduler`` do once started (in a process of its
    own: freezing would change this test process's collector)."""
    import subprocess
    import sys

    code = (
        "import gc; from duecourse.engine.runner import GC_THRESHOLD, freeze_startup_heap; "
        "before = gc.get_freeze_count(); freeze_startup_heap(); "
        "print(before, gc.get_freeze_count() > 1000, gc.get_threshold() == GC_THRESHOLD, GC_THRESHOLD[0] > 700)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "True", "True", "True"]
