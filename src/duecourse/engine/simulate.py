"""Simulation, or safe mode (SPEC §4.12): what the engine would do over the next days.

The same engine code runs, cycle by cycle, on a copy of the state, and providers only record what
they would send. On PostgreSQL the copy is one transaction that is rolled back at the end (every
unit of work inside it is a savepoint); on SQLite it is a copy of the database file made with
SQLite's online backup, deleted afterwards. Nothing is left behind either way.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from duecourse.channels.base import OutboundMessage, SendResult
from duecourse.db import Database
from duecourse.db.session import unit_of_work
from duecourse.engine.cycle import tick
from duecourse.engine.models import ExecutionLogEntry
from duecourse.ledger.models import Account

MAX_DAYS = 31


class _Recorder:
    """A provider that sends nothing and answers like a real one."""

    in_transaction = True

    def send(self, message: OutboundMessage) -> SendResult:
        return SendResult(provider_ref=f"simulated-{message.idempotency_key}")


class _Copy:
    """Quacks like :class:`Database` for the engine, on one connection whose outer transaction the
    caller rolls back."""

    def __init__(self, db: Database, connection: Any) -> None:
        self.connection = connection
        self.url = db.url
        self.dialect = db.dialect

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        session = Session(bind=self.connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
        with unit_of_work(session):
            yield session


def simulate(
    db: Database,
    *,
    organization_id: int,
    start: datetime,
    days: int,
    strategy_id: int | None = None,
    campaign_id: int | None = None,
) -> dict[str, Any]:
    """Run one engine cycle an hour for ``days`` days from ``start`` and return what would happen:
    every dispatch (account, channel, stage, time) and every skip, deferral and cancellation with its
    reason. Optionally only for one strategy's or one campaign's accounts. Changes nothing."""
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_DAYS}")
    def run(copy: Any) -> list[dict[str, Any]]:
        recorder = _Recorder()
        t, end = start, start + timedelta(days=days)
        while t < end:
            tick(copy, now=t, worker="simulation", providers=lambda *_: recorder, organization_id=organization_id)
            t += timedelta(hours=1)
        with copy.transaction() as session:
            return _events(session, organization_id=organization_id, start=start, strategy_id=strategy_id, campaign_id=campaign_id)

    if db.dialect == "sqlite":
        with tempfile.TemporaryDirectory(prefix="duecourse-simulation-") as tmp:
            target = Path(tmp) / "copy.db"
            raw = db.engine.raw_connection()
            try:
                dest = sqlite3.connect(target)
                raw.driver_connection.backup(dest)  # a consistent snapshot, while others keep working
                dest.close()
            finally:
                raw.close()
            copy_db = Database(f"sqlite:///{target}")
            try:
                events = run(copy_db)
            finally:
                copy_db.dispose()
    else:
        with db.engine.connect() as connection:
            outer = connection.begin()
            try:
                events = run(_Copy(db, connection))
            finally:
                outer.rollback()
    summary: dict[str, int] = {}
    for e in events:
        key = e["event"] if e["event"] != "skipped" else f"skipped:{e['reason']}"
        summary[key] = summary.get(key, 0) + 1
    return {"start": start, "days": days, "summary": summary, "events": events}


_SHOWN = ("assigned", "first_action", "dispatched", "skipped", "deferred", "cancelled", "sequence_completed", "restarted", "reset")


def _events(session: Session, *, organization_id: int, start: datetime, strategy_id: int | None, campaign_id: int | None) -> list[dict[str, Any]]:
    stmt = (
        select(ExecutionLogEntry, Account.external_id, Account.name, Account.strategy_id, Account.campaign_id)
        .join(Account, Account.id == ExecutionLogEntry.account_id)
        .where(ExecutionLogEntry.organization_id == organization_id, ExecutionLogEntry.at >= start,
               ExecutionLogEntry.event.in_(_SHOWN))
        .order_by(ExecutionLogEntry.at, ExecutionLogEntry.id)
    )
    if strategy_id is not None:
        stmt = stmt.where(Account.strategy_id == strategy_id)
    if campaign_id is not None:
        stmt = stmt.where(Account.campaign_id == campaign_id)
    out = []
    for entry, external_id, name, _, _ in session.execute(stmt):
        details = entry.details or {}
        out.append({
            "at": entry.at, "account_id": entry.account_id, "external_id": external_id, "name": name,
            "event": entry.event, "stage_index": entry.stage_index, "reason": entry.reason,
            "channel": details.get("channel"), "retry_at": details.get("retry_at"),
        })
    return out
