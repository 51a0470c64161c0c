"""Dispatch through providers that talk to the network (SPEC §4.6, §10): sends happen with no
transaction open, a journaled send is never repeated after a crash, a failing provider is left alone
for a cool-down without holding up other organizations, and an address a provider calls invalid is
flagged. The providers here stand in for remote services; the engine, the database and the
transactions are the real ones."""

from __future__ import annotations

import threading
from datetime import date, timedelta

import pytest
from sqlalchemy import select

from duecourse.channels.base import ProviderError, SendResult
from duecourse.engine.cycle import run_scheduled, tick
from duecourse.engine.dispatch import _Batch, _send_all, claim, process_item, run_due
from duecourse.engine.models import Interaction, QueueItem
from duecourse.ledger.models import Account
from duecourse.tenancy.models import Organization
from tests.engine_helpers import debtor, items, log, refresh
from tests.test_engine_dispatch import _setup


class Remote:
    """A stand-in for a remote provider: records what it was asked to send, can fail."""

    def __init__(self, fail: ProviderError | None = None) -> None:
        self.sent: list[str] = []
        self.fail = fail
        self.in_transaction_seen: list[bool] = []
        self.lock = threading.Lock()

    def send(self, message):  # type: ignore[no-untyped-def]
        with self.lock:
            self.sent.append(message.idempotency_key)
        if self.fail is not None:
            raise self.fail
        return SendResult(provider_ref=f"remote-{message.idempotency_key}")


class ByOrg:
    """The provider factory: one remote per organization."""

    def __init__(self, remotes: dict[int, Remote]) -> None:
        self.remotes = remotes

    def __call__(self, session, now, organization_id, channel):  # type: ignore[no-untyped-def]
        return self.remotes[organization_id]


def _debtors(db, org, now, n, prefix):
    with db.transaction() as s:
        ids = [debtor(s, org.id, now, f"{prefix}{i}", due=date(2026, 3, 1)).id for i in range(n)]
        refresh(s, org.id, now)
    return ids


def _enqueue(db, org_id, now):
    """The scheduler's work (the strategy's run: assignment and enqueue), no dispatch."""
    with db.transaction() as s:
        run_scheduled(s, org=s.get(Organization, org_id), now=now, worker="scheduler")


def test_a_journaled_send_is_recorded_not_repeated_after_a_crash(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("email", "p", 3)])
    (aid,) = _debtors(db, org, now, 1, "CRASH")
    tick(db, now=now, providers=ByOrg({org.id: Remote()}), organization_id=org.id)  # assign + enqueue + send
    with db.transaction() as s:
        assert [i[1] for i in items(s, aid)] == ["completed"]
    # The next stage is due three days later; this time the worker dies after the send was journaled.
    clock.advance(days=3)
    remote = Remote()
    providers = ByOrg({org.id: remote})
    _enqueue(db, org.id, clock.now())
    batch = _Batch()
    with db.transaction() as s:
        ids = claim(s, batch, now=clock.now(), worker="w1", limit=10)
        assert [process_item(s, item_id=i, now=clock.now(), providers=providers, batch=batch) for i in ids] == ["sending"]
    _send_all(db, batch.sends, now=clock.now())
    assert remote.sent == [f"qi-{ids[0]}"]
    # ... and never recorded it. Its lease expires; another worker picks the item up.
    clock.advance(minutes=30)
    counts = run_due(db, now=clock.now(), worker="w2", providers=providers)
    assert counts == {"dispatched": 1}
    assert remote.sent == [f"qi-{ids[0]}"]  # not sent a second time
    with db.transaction() as s:
        item = s.get(QueueItem, ids[0])
        assert (item.status.value, item.provider_ref) == ("completed", f"remote-qi-{ids[0]}")
        assert len(s.scalars(select(Interaction).where(Interaction.queue_item_id == item.id)).all()) == 1
        assert s.get(Account, aid).case_sequence_finished


def test_a_failing_provider_is_left_alone_and_does_not_hold_up_other_organizations(db, org, other_org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0)])
    _setup(db, other_org, now, [("email", "t", 0)])
    down_ids = _debtors(db, org, now, 3, "DOWN")
    _debtors(db, other_org, now, 3, "UP")
    down, up = Remote(fail=ProviderError("connection refused", retryable=True)), Remote()
    providers = ByOrg({org.id: down, other_org.id: up})
    for o in (org, other_org):
        _enqueue(db, o.id, now)
    counts = run_due(db, now=now, worker="w", providers=providers)
    assert len(up.sent) == 3 and len(down.sent) == 1  # the rest of the failing group was not tried
    assert counts == {"dispatched": 3, "retry": 1, "deferred": 2}
    with db.transaction() as s:
        rows = [s.scalars(select(QueueItem).where(QueueItem.account_id == a)).one() for a in down_ids]
        attempts = sorted((r.status.value, r.attempt) for r in rows)
        assert attempts == [("pending", 0), ("pending", 0), ("pending", 1)]  # only the tried one spent an attempt
        assert all(r.scheduled_at > now for r in rows)
        held = [e for a in down_ids for e in log(s, a) if e[0] == "deferred"]
        assert [e[2] for e in held] == ["provider_unavailable", "provider_unavailable"]
    # Within the cool-down nothing is sent to the failing provider again.
    assert run_due(db, now=now + timedelta(seconds=30), worker="w", providers=providers) == {}
    assert len(down.sent) == 1
    # It recovers: after the cool-down and the back-off everything goes out.
    down.fail = None
    later = now + timedelta(hours=1)
    assert run_due(db, now=later, worker="w", providers=providers) == {"dispatched": 3}
    assert len(down.sent) == 4


def test_an_address_the_provider_calls_invalid_is_flagged_and_skipped(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("sms", "t", 0), ("sms", "p", 1), ("email", "p", 1)])
    (aid,) = _debtors(db, org, now, 1, "BADNUM")
    remote = Remote(fail=ProviderError("21211 invalid 'To' number", retryable=False, invalid_address=True))
    tick(db, now=now, providers=ByOrg({org.id: remote}), organization_id=org.id)
    with db.transaction() as s:
        a = s.get(Account, aid)
        assert a.phone_invalid and not a.email_invalid
        assert [(i[1], i[3]) for i in items(s, aid)][0] == ("failed", "provider_error")
        assert ("contact_invalid", 0, "phone_invalid") in log(s, aid)
    assert org.get(f"/api/v1/accounts/{aid}").json()["phone_invalid"] is True
    # The next SMS stage is skipped with its reason, without asking the provider again.
    remote.fail = None
    clock.advance(days=1)
    tick(db, now=clock.now(), providers=ByOrg({org.id: remote}), organization_id=org.id)
    with db.transaction() as s:
        assert ("skipped", "invalid_contact_info") in [(i[1], i[3]) for i in items(s, aid)]
    assert len(remote.sent) == 1
    # A corrected number gets a new chance.
    r = org.patch(f"/api/v1/accounts/{aid}", json={"phone": "+34600999888"})
    assert r.status_code == 200 and r.json()["phone_invalid"] is False


def test_two_messages_for_one_account_in_one_batch_go_one_after_the_other(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("email", "t", 0)], multi_stage_handling="run_all_in_order")
    (aid,) = _debtors(db, org, now, 1, "TWICE")
    remote = Remote()
    tick(db, now=now, providers=ByOrg({org.id: remote}), organization_id=org.id)
    # The first went out; the second saw it and met the one-contact-a-day limit.
    assert len(remote.sent) == 1
    with db.transaction() as s:
        got = [(i[0], i[1], i[3]) for i in items(s, aid)]
        assert got[:2] == [(0, "completed", None), (1, "skipped", "frequency_limit")]
        assert got[2][:2] == (1, "pending")


def _sent_not_recorded(db, org, now, stages, external_id):  # type: ignore[no-untyped-def]
    """One account's first stage sent to a remote provider by worker w1, which has not recorded it."""
    _setup(db, org, now, stages)
    (aid,) = _debtors(db, org, now, 1, external_id)
    _enqueue(db, org.id, now)
    remote = Remote()
    providers = ByOrg({org.id: remote})
    batch = _Batch()
    with db.transaction() as s:
        (item_id,) = claim(s, batch, now=now, worker="w1", limit=10)
        assert process_item(s, item_id=item_id, now=now, providers=providers, batch=batch) == "sending"
    _send_all(db, batch.sends, now=now)
    return aid, item_id, remote, providers


def test_a_message_handed_to_the_network_is_held_for_the_organizations_lease(db, org, clock):
    """Only a message on its way to a network provider is committed as ``processing``, with a lease of
    ``dispatch.lease_seconds`` plus a margin per message ahead of it (30 s each, here one)."""
    r = org.patch("/api/v1/settings", json={"dispatch": {"lease_seconds": 120}})
    assert r.status_code == 200, r.text
    now = clock.now()
    aid, item_id, remote, providers = _sent_not_recorded(db, org, now, [("email", "t", 0)], "LEASED")
    with db.transaction() as s:
        item = s.get(QueueItem, item_id)
        assert (item.status.value, item.claimed_by, item.attempt) == ("processing", "w1", 1)
        assert item.lease_expires_at == now + timedelta(seconds=150)
    # Until then no other worker takes it; after it, the next one records the send, not repeating it.
    assert run_due(db, now=now + timedelta(seconds=149), worker="w2", providers=providers) == {}
    assert run_due(db, now=now + timedelta(seconds=151), worker="w2", providers=providers) == {"dispatched": 1}
    assert remote.sent == [f"qi-{item_id}"]


def test_a_message_is_not_sent_once_its_item_is_no_longer_the_workers(db, org, clock):
    """Between the batch's commit and the send, the item's lease ran out and another worker took it
    (or the batch never committed): the first worker must not send it too."""
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0)])
    _debtors(db, org, now, 1, "TAKEN")
    _enqueue(db, org.id, now)
    remote = Remote()
    batch = _Batch()
    with db.transaction() as s:
        (item_id,) = claim(s, batch, now=now, worker="w1", limit=10)
        assert process_item(s, item_id=item_id, now=now, providers=ByOrg({org.id: remote}), batch=batch) == "sending"
    with db.transaction() as s:
        s.get(QueueItem, item_id).claimed_by = "w2"
    _send_all(db, batch.sends, now=now)
    assert remote.sent == [] and batch.sends[0].withheld


def test_a_delivery_report_faster_than_the_bookkeeping_is_applied_when_the_send_is_recorded(db, org, clock):
    now = clock.now()
    aid, item_id, remote, providers = _sent_not_recorded(db, org, now, [("email", "t", 0), ("sms", "p", 3)], "FAST")
    # The provider reports the bounce before the worker has recorded the dispatch.
    r = org.post("/api/v1/outcomes/delivery", role="manager",
                 json={"provider_ref": f"remote-qi-{item_id}", "status": "bounced", "error": "550 unknown user"})
    assert r.status_code == 200 and r.json() == {"result": "pending"}
    with db.transaction() as s:
        assert [i[1] for i in items(s, aid)] == ["processing"]
    # The worker dies here; the next one records the send and then the report.
    counts = run_due(db, now=now + timedelta(minutes=30), worker="w2", providers=providers)
    assert remote.sent == [f"qi-{item_id}"]
    with db.transaction() as s:
        events = [e[0] for e in log(s, aid)]
        assert events.index("dispatched") < events.index("delivery_failed")
        assert s.scalars(select(Interaction.status).where(Interaction.queue_item_id == item_id)).one().value == "bounced"
        assert s.get(QueueItem, item_id).early_report is None
        # The next stage was queued at once (the message never arrived) and met the one-a-day limit.
        assert [(i[0], i[1], i[3]) for i in items(s, aid)] == [
            (0, "completed", None), (1, "skipped", "frequency_limit"), (1, "pending", None)]
    assert counts == {"dispatched": 1, "skipped": 1}


def test_a_call_reported_failed_before_the_worker_recorded_it_is_a_delivery_failure(db, org, clock):
    now = clock.now()
    aid, item_id, _, providers = _sent_not_recorded(db, org, now, [("voice", "t", 0), ("sms", "p", 3)], "NOCALL")
    # The voice service says the number cannot be called, before the worker has recorded the call.
    r = org.post("/api/v1/outcomes/call", role="manager", json={"provider_ref": f"remote-qi-{item_id}", "failed": True})
    assert r.status_code == 200 and r.json() == {"result": "pending"}
    run_due(db, now=now + timedelta(minutes=30), worker="w2", providers=providers)
    with db.transaction() as s:
        events = [e[0] for e in log(s, aid)]
        assert events.index("dispatched") < events.index("delivery_failed")
        assert s.scalars(select(Interaction.status).where(Interaction.queue_item_id == item_id)).one().value == "failed"
        # The stage completed with the failure and the SMS was queued at once, not after the step timeout.
        assert s.get(Account, aid).case_next_stage == 1
        assert [(i[0], i[1]) for i in items(s, aid)][:1] == [(0, "completed")]
        assert any(i[0] == 1 for i in items(s, aid))


def test_an_account_being_sent_to_by_another_worker_waits(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("email", "t", 0)], multi_stage_handling="run_all_in_order")
    (aid,) = _debtors(db, org, now, 1, "BUSY")
    _enqueue(db, org.id, now)
    remote = Remote()
    providers = ByOrg({org.id: remote})
    # Worker A has the first email rendered and on its way to the provider (committed, not recorded).
    batch = _Batch()
    with db.transaction() as s:
        first = claim(s, batch, now=now, worker="A", limit=1)
        assert len(first) == 1  # a claim takes what it is asked for, on both databases
        assert process_item(s, item_id=first[0], now=now, providers=providers, batch=batch) == "sending"
        # As if the case had moved on to the second stage meanwhile (the stage order rule would
        # otherwise hold the second item back on its own).
        s.get(Account, aid).case_next_stage = 1
    # Worker B meanwhile: the second email must not go out before A's send is counted.
    assert run_due(db, now=now, worker="B", providers=providers) == {"deferred": 1}
    assert remote.sent == []
    with db.transaction() as s:
        assert ("deferred", 1, "in_flight") in log(s, aid)
        second = s.scalars(select(QueueItem).where(QueueItem.account_id == aid, QueueItem.stage_index == 1)).one()
        assert (second.status.value, second.attempt, second.scheduled_at) == ("pending", 0, now + timedelta(minutes=1))


def test_a_claim_takes_exactly_what_it_asks_for_and_holds_it_for_its_transaction_only(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0)])
    _debtors(db, org, now, 5, "CLAIM")
    _enqueue(db, org.id, now)
    with db.transaction() as s:
        batch = _Batch()
        ids = claim(s, batch, now=now, worker="A", limit=2)
        assert len(ids) == 2 and sorted(batch.items) == sorted(ids)
    # A transaction that claimed items and handled none of them leaves them as they were: a worker
    # that dies mid-batch leaves nothing to recover.
    with db.transaction() as s:
        assert sorted((q.status.value, q.attempt, q.claimed_by) for q in s.scalars(select(QueueItem))) == [
            ("pending", 0, None)] * 5


def test_two_workers_claim_different_items_and_pass_by_an_account_the_other_holds(db, org, clock):
    if db.dialect != "postgresql":
        pytest.skip("two workers at once are a PostgreSQL deployment (SQLite has one writer)")
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("email", "t", 0)], multi_stage_handling="run_all_in_order")
    accounts = _debtors(db, org, now, 3, "PAIR")  # each with both stages due now
    _enqueue(db, org.id, now)
    with db.transaction() as s:
        item_of = {(q.account_id, q.stage_index): q.id for q in s.scalars(select(QueueItem))}
    assert len(item_of) == 6
    one, two, three = sorted(accounts)
    with db.transaction() as a:
        first = claim(a, _Batch(), now=now, worker="A", limit=2)  # due first: the first stages
        assert sorted(first) == sorted([item_of[(one, 0)], item_of[(two, 0)]])
        with db.transaction() as b:
            batch_b = _Batch()
            second = claim(b, batch_b, now=now, worker="B", limit=10)
            # B passes by A's items, and by the second stages of the accounts A holds, without
            # locking them: a third transaction (a request cancelling them) gets them at once.
            assert sorted(second) == sorted([item_of[(three, 0)], item_of[(three, 1)]])
            assert sorted(batch_b.items) == sorted(second)
            with db.transaction() as c:
                free = c.scalars(
                    select(QueueItem.id).where(QueueItem.id.in_([item_of[(one, 1)], item_of[(two, 1)]]))
                    .with_for_update(nowait=True)
                ).all()
                assert sorted(free) == sorted([item_of[(one, 1)], item_of[(two, 1)]])
    # Once A is done, a run takes every item: each first email goes out once, and each second one
    # meets the email limit (one a day) and is moved to tomorrow.
    assert run_due(db, now=now, worker="B") == {"dispatched": 3, "skipped": 3}
    with db.transaction() as s:
        assert sorted((q.stage_index, q.status.value, q.reason) for q in s.scalars(select(QueueItem))) == (
            [(0, "completed", None)] * 3 + [(1, "pending", None)] * 3 + [(1, "skipped", "frequency_limit")] * 3)


def test_a_run_passes_by_an_account_another_transaction_holds_and_ends(db, org, clock):
    """A worker does not wait for an account someone else is writing (an import, a request), nor
    claim its item again and again: the run ends, and the next one sends it."""
    if db.dialect != "postgresql":
        pytest.skip("row locks are PostgreSQL's (SQLite has one writer)")
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0)])
    held, free = _debtors(db, org, now, 2, "HELD")
    _enqueue(db, org.id, now)
    with db.transaction() as other:
        other.execute(select(Account.id).where(Account.id == held).with_for_update())
        assert run_due(db, now=now, worker="w") == {"dispatched": 1}
        with db.transaction() as s:
            assert [(q.status.value, q.attempt, q.claimed_by) for q in items_of(s, held)] == [("pending", 0, None)]
            assert [q.status.value for q in items_of(s, free)] == ["completed"]
    assert run_due(db, now=now, worker="w") == {"dispatched": 1}


def items_of(s, account_id):  # type: ignore[no-untyped-def]
    return s.scalars(select(QueueItem).where(QueueItem.account_id == account_id)).all()


def test_a_batch_sends_at_most_max_network_sends_and_releases_the_rest(db, org, clock, monkeypatch):
    """Network sends go out one after another after the batch commits, each item's lease extended by
    one send's worth: a batch takes at most MAX_NETWORK_SENDS of them and releases the others (not
    counted as an attempt) for the next batch, so a dead worker's items wait a bounded time."""
    from duecourse.engine import dispatch

    monkeypatch.setattr(dispatch, "MAX_NETWORK_SENDS", 3)
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0)])
    _debtors(db, org, now, 5, "NET")
    _enqueue(db, org.id, now)
    remote = Remote()
    outcomes = dispatch._run_batch(db, now=now, worker="w", providers=ByOrg({org.id: remote}), limit=500)
    assert sorted(outcomes) == ["dispatched"] * 3 + ["released"] * 2
    assert len(remote.sent) == 3
    with db.transaction() as s:
        waiting = s.scalars(select(QueueItem).where(QueueItem.status == "pending")).all()
        assert len(waiting) == 2 and all(q.attempt == 0 and q.claimed_by is None for q in waiting)
    # The next pass takes them; every message went out exactly once.
    assert run_due(db, now=now, worker="w", providers=ByOrg({org.id: remote})) == {"dispatched": 2}
    assert sorted(remote.sent) == sorted(set(remote.sent)) and len(remote.sent) == 5


class ChangesAccounts(Remote):
    """A remote during whose first send the debtors act: one unsubscribes from email, another
    account is paused by a manager (the batch has already decided to write to both)."""

    def __init__(self, db, opted_out: int, paused: int) -> None:
        super().__init__()
        self.db, self.opted_out, self.paused = db, opted_out, paused

    def send(self, message):  # type: ignore[no-untyped-def]
        if not self.sent:
            with self.db.transaction() as s:
                s.get(Account, self.opted_out).opt_out_email = True
                s.get(Account, self.paused).paused = True
        return super().send(message)


def test_an_account_that_changes_while_the_batch_sends_is_not_written_to(db, org, clock):
    now = clock.now()
    _setup(db, org, now, [("email", "t", 0), ("email", "p", 3)])
    first, opted_out, paused = _debtors(db, org, now, 3, "LATE")
    remote = ChangesAccounts(db, opted_out, paused)
    tick(db, now=now, providers=ByOrg({org.id: remote}), organization_id=org.id)
    with db.transaction() as s:
        qi = {a: s.scalars(select(QueueItem.id).where(QueueItem.account_id == a)).first() for a in (first, opted_out, paused)}
        assert remote.sent == [f"qi-{qi[first]}"]  # the other two were withheld at the last moment
        assert [(i[0], i[1], i[3]) for i in items(s, opted_out)][0] == (0, "skipped", "opt_out")
        assert s.get(Account, opted_out).case_next_stage == 1  # an opt-out moves the case on, as at batch start
        assert [(i[0], i[1], i[3]) for i in items(s, paused)] == [(0, "cancelled", "account_paused")]
        assert ("skipped", 0, "opt_out") in log(s, opted_out)
        assert ("cancelled", 0, "account_paused") in log(s, paused)
        assert s.scalars(select(Interaction.account_id).where(Interaction.account_id.in_([opted_out, paused]))).all() == []
