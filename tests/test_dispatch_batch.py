"""A dispatch batch writes its rows with Core (engine.dispatch_rows): the same rows, in the same
order, as handling the items one at a time through the ORM; a few statements per batch; nothing at
all when the batch fails (its items are then redone one by one)."""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import event, select

from duecourse.channels.models import SandboxMessage
from duecourse.engine.dispatch import _Batch, _run_batch, claim, process_item, run_due, sandbox_providers
from duecourse.engine.models import ExecutionLogEntry, Interaction, QueueItem
from duecourse.ledger.models import Account
from tests.engine_helpers import debtor, refresh
from tests.test_dispatch_network import _enqueue
from tests.test_engine_dispatch import _setup

API = "/api/v1"

# (external id prefix, debtor fields): sent, refused by each contact rule, sent twice (the second
# stage meets the frequency limit and is deferred), resolved before dispatch (cancelled).
CASES: list[tuple[str, dict[str, Any]]] = [
    ("SENT", {}),
    ("OPT", {"opt_out_email": True}),
    ("NOADDR", {"email": None}),
    ("INVALID", {"email_invalid": True}),
    ("SENT2", {"timezone": "America/New_York"}),
]


def _debtors(db, org_id, now, suffix):
    with db.transaction() as s:
        for prefix, fields in CASES:
            debtor(s, org_id, now, f"{prefix}{suffix}", due=date(2026, 3, 1), **fields)
        refresh(s, org_id, now)


def _snapshot(db, org_id) -> dict[str, Any]:
    """Everything dispatch wrote for the organization, by account, without ids that differ between runs."""
    out: dict[str, Any] = {}
    with db.transaction() as s:
        accounts = s.scalars(select(Account).where(Account.organization_id == org_id).order_by(Account.id)).all()
        for a in accounts:
            key = a.external_id.rstrip("AB")
            item_ids = {q.id: i for i, q in enumerate(s.scalars(select(QueueItem).where(QueueItem.account_id == a.id).order_by(QueueItem.id)))}

            def norm(value: Any, item_ids: dict[int, int] = item_ids, ext: str = a.external_id, key: str = key) -> Any:
                if isinstance(value, str):
                    for qid, i in item_ids.items():
                        value = value.replace(f"qi-{qid}", f"qi-#{i}")
                    value = value.replace(ext, key).replace(ext.lower(), key.lower())
                return value

            out[key] = {
                "account": (a.status, a.case_next_stage, a.case_sequence_finished, a.collection_tab, a.last_interaction_at,
                            a.case_prev_completed_at, a.email_invalid),
                "items": [(q.stage_index, q.status, q.reason, q.scheduled_at, q.attempt, norm(q.provider_ref), q.sent_at,
                           q.finished_at, q.claimed_by, q.lease_expires_at, item_ids.get(q.retry_of_id), q.error)
                          for q in s.scalars(select(QueueItem).where(QueueItem.account_id == a.id).order_by(QueueItem.id))],
                "log": [(e.event, e.at, e.case_number, e.stage_index, item_ids.get(e.queue_item_id), e.reason, e.cause,
                         {k: norm(v) for k, v in e.details.items()} if e.details else e.details)
                        for e in s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.account_id == a.id)
                                           .order_by(ExecutionLogEntry.id))
                        if e.event not in ("assigned", "first_action")],
                "interactions": [(item_ids.get(i.queue_item_id), i.channel, i.direction, i.status, norm(i.provider_ref),
                                  i.stage_index, i.occurred_at, i.is_manual, i.outcome)
                                 for i in s.scalars(select(Interaction).where(Interaction.account_id == a.id).order_by(Interaction.id))],
                "outbox": [(norm(m.idempotency_key), norm(m.provider_ref), m.channel, norm(m.to), norm(m.subject),
                            norm(m.body_text), m.body_html, m.tone, m.created_at)
                           for m in s.scalars(select(SandboxMessage).where(SandboxMessage.account_id == a.id).order_by(SandboxMessage.id))],
            }
    return out


def test_a_mixed_batch_writes_exactly_what_one_item_at_a_time_writes(db, org, other_org, clock):
    now = clock.now()
    stages = [("email", "t", 0), ("email", "p", 0)]  # both due today: the second meets the frequency limit
    for o, suffix in ((org, "A"), (other_org, "B")):
        # Every exclusion rule on, so the tab each account ends with is computed with all of them
        # (on PostgreSQL in the batch's account UPDATE, item by item by the separate refresh).
        r = o.patch(f"{API}/settings", json={"exclusions": {"min_balance": "1", "excluded_tags": ["vip", "legal"],
                                                             "exclude_only_disputed": True}})
        assert r.status_code == 200, r.text
        _setup(db, o, now, stages)
        _debtors(db, o.id, now, suffix)
        _enqueue(db, o.id, now)
    # org: one batch (Core rows); other_org: item by item, one transaction each (ORM objects).
    counts = run_due(db, now=now, worker="w", organization_id=org.id)
    with db.transaction() as s:
        ids = claim(s, _Batch(), now=now, worker="w", limit=100, organization_id=other_org.id)
    one_by_one: dict[str, int] = {}
    for item_id in ids:
        with db.transaction() as s:
            batch = _Batch()
            assert claim(s, batch, now=now, worker="w", limit=1, ids=[item_id]) == [item_id]
            outcome = process_item(s, item_id=item_id, now=now, batch=batch).split(":")[0]
        one_by_one[outcome] = one_by_one.get(outcome, 0) + 1
    assert counts == one_by_one == {"dispatched": 2, "skipped": 8}
    batch, single = _snapshot(db, org.id), _snapshot(db, other_org.id)
    assert batch == single
    # And what that is, spelled out for the account sent to twice in one batch.
    sent = batch["SENT"]
    assert [(i[0], i[1], i[2]) for i in sent["items"]] == [(0, "completed", None), (1, "skipped", "frequency_limit"),
                                                          (1, "pending", None)]
    assert [e[0] for e in sent["log"]] == ["enqueued", "enqueued", "dispatched", "advanced", "skipped", "enqueued"]
    assert sent["log"][2][7] == {"channel": "email", "provider_ref": "sandbox-qi-#0"}
    assert [(i[0], i[3], i[4]) for i in sent["interactions"]] == [(0, "sent", "sandbox-qi-#0")]
    assert [(m[0], m[3], m[4]) for m in sent["outbox"]] == [("qi-#0", "sent@example.com", "Invoice SENT-1")]
    for refused, reason in (("OPT", "opt_out"), ("NOADDR", "no_contact_info"), ("INVALID", "invalid_contact_info")):
        got = batch[refused]
        assert [(i[1], i[2]) for i in got["items"]] == [("skipped", reason), ("skipped", reason)]
        assert got["interactions"] == [] and got["outbox"] == []
        assert got["account"][0] == "sequence_completed"


def test_a_batch_inserts_each_table_once(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0)])
    with db.transaction() as s:
        for i in range(7):
            debtor(s, org.id, now, f"MANY{i}", due=date(2026, 3, 1))
        refresh(s, org.id, now)
    _enqueue(db, org.id, now)
    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        statements.append(" ".join(statement.split()[:3]))

    event.listen(db.engine, "before_cursor_execute", seen)
    try:
        assert _run_batch(db, now=now, worker="w", providers=sandbox_providers) == ["dispatched"] * 7
    finally:
        event.remove(db.engine, "before_cursor_execute", seen)
    inserts = sorted(s for s in statements if s.startswith("INSERT"))
    assert inserts == ["INSERT INTO execution_log", "INSERT INTO interactions", "INSERT INTO sandbox_outbox"]
    # The claim writes nothing (SQLite: one no-op UPDATE takes the database's write lock); the
    # items' changes and the accounts' changes are one statement each (their sets of changed
    # columns are the same) with, on PostgreSQL, the accounts' new tabs (SQLite refreshes the tabs
    # in one more statement). The reads: the paused organizations, the items with their accounts,
    # contacts, other workers' sends, invoices, and the organization, its settings, the strategy,
    # its stages and the template, once per batch.
    postgres = db.engine.dialect.name == "postgresql"
    updates = [s for s in statements if s.startswith("UPDATE")]
    assert updates == (["UPDATE queue_items SET", "UPDATE accounts SET"] if postgres else
                       ["UPDATE queue_items SET", "UPDATE queue_items SET", "UPDATE accounts SET", "UPDATE accounts SET"])
    assert len([s for s in statements if s.startswith("SELECT")]) == 10, statements
    with db.transaction() as s:
        assert len(s.scalars(select(SandboxMessage)).all()) == 7
        assert len(s.scalars(select(Interaction)).all()) == 7
        assert [e.event for e in s.scalars(select(ExecutionLogEntry).order_by(ExecutionLogEntry.id))
                if e.event in ("dispatched", "sequence_completed")] == ["dispatched", "sequence_completed"] * 7


def test_a_batch_that_fails_at_its_insert_writes_nothing_and_is_redone_item_by_item(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0)])
    with db.transaction() as s:
        accounts = [debtor(s, org.id, now, f"RE{i}", due=date(2026, 3, 1)).id for i in range(3)]
        refresh(s, org.id, now)
    _enqueue(db, org.id, now)
    with db.transaction() as s:
        # An outbox row already holds the second item's idempotency key: its insert must fail.
        victim = s.scalars(select(QueueItem).where(QueueItem.account_id == accounts[1])).one()
        s.add(SandboxMessage(organization_id=org.id, account_id=accounts[1], idempotency_key=f"qi-{victim.id}",
                             provider_ref="earlier", channel="email", to="x@example.com", body_text="earlier",
                             created_at=now))
    assert run_due(db, now=now, worker="w") == {"dispatched": 2, "failed": 1}
    with db.transaction() as s:
        for account_id in accounts:
            item = s.scalars(select(QueueItem).where(QueueItem.account_id == account_id)).one()
            interactions = s.scalars(select(Interaction).where(Interaction.account_id == account_id)).all()
            messages = s.scalars(select(SandboxMessage).where(SandboxMessage.account_id == account_id)).all()
            events = [e.event for e in s.scalars(select(ExecutionLogEntry).where(ExecutionLogEntry.account_id == account_id)
                                                 .order_by(ExecutionLogEntry.id))]
            if account_id == accounts[1]:
                assert (item.status, item.reason) == ("failed", "internal_error")
                # The queue, shown to every role, names the failure without the SQL and its values.
                assert item.error == "internal error (IntegrityError); the worker's log has the details"
                assert interactions == [] and [m.provider_ref for m in messages] == ["earlier"]
                assert "dispatched" not in events
            else:
                assert item.status == "completed"
                assert len(interactions) == 1 and len(messages) == 1
                assert events.count("dispatched") == 1
