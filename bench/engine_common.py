"""Shared set-up for the engine benchmarks (``enqueue_bench.py``, ``dispatch_bench.py``).

Accounts and invoices are generated in the database itself (``INSERT … SELECT generate_series`` on
PostgreSQL, a recursive CTE on SQLite) with the derived values the ledger would give them: one open
invoice each, balance = gross_open = the invoice's total, carrying invoice and due date set, status
``unassigned`` and tab ``outstanding`` (money owed, no strategy). ``check_derived`` verifies on a
sample that ``refresh_accounts`` changes nothing.
"""

from __future__ import annotations

import os
import platform
import secrets
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import event, text

# The engine signs every message's unsubscribe link and refuses to sign with no key. Set before
# duecourse is imported (its settings are read once), and inherited by the worker processes.
os.environ.setdefault("DUECOURSE_SECRET_KEY", secrets.token_urlsafe(48))

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
ORG_TZ = "Europe/Madrid"
# A Tuesday, 12:00 UTC (13:00 in Madrid): after the strategy's 07:00 slot.
NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
NOW_NAIVE = NOW.replace(tzinfo=None)  # for raw SQL binds into naive UTC columns

BODY = (
    "Hello {{ debtor_name }},\n\nInvoice {{ carrying_invoice_number }} for {{ carrying_invoice_amount }} "
    "{{ currency }} was due on {{ carrying_invoice_due_date }}. You can pay here: {{ payment_link }}\n\n"
    "Unsubscribe: {{ unsubscribe_link }}"
)


def machine() -> dict[str, Any]:
    cpu, mem_kb = "unknown", 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    with psycopg.connect(PG_ADMIN) as conn:
        pg_version = conn.execute("SHOW server_version").fetchone()[0]
        pg_conf = {
            k: conn.execute(f"SHOW {k}").fetchone()[0]
            for k in ("shared_buffers", "max_wal_size", "work_mem", "autovacuum", "synchronous_commit")
        }
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "postgresql_config": pg_conf,
        "sqlite": sqlite3.sqlite_version,
        "os": platform.platform(),
        "load_average": os.getloadavg(),
        "git_head": _git_head(),
    }


def _git_head() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except OSError:
        return "unknown"


def fresh_pg(db_name: str) -> str:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{db_name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{db_name}"


def drop_pg(db_name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


def fresh_sqlite(path: Path) -> str:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return f"sqlite:///{path}"


def drop_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


_ACCOUNT_COLS = (
    "id, organization_id, external_id, name, email, currency, opt_out_email, opt_out_sms, opt_out_whatsapp, "
    "opt_out_voice, blocked, paused, on_stop, status, case_number, case_retry_count, case_sequence_finished, "
    "balance, gross_open, carrying_invoice_id, carrying_due_date, collection_tab, created_at, updated_at"
)
_INVOICE_COLS = (
    "id, organization_id, account_id, external_id, number, currency, total, amount_paid, issue_date, due_date, "
    "status, disputed, created_at, updated_at"
)


def load_accounts(url: str, org_id: int, n: int) -> float:
    """n accounts, each with one open invoice (EUR, 100.00–599.99, due 30–89 days before NOW)."""
    from duecourse.db import Database

    t = time.monotonic()
    db = Database(url)
    pg = url.startswith("postgresql")
    try:
        with db.transaction() as s:
            if pg:
                src = "generate_series(1, :n) AS g(x)"
                due = "(date '2026-09-01' + (x % 60))"
                issue = "(date '2026-08-01' + (x % 60))"
                f, t_ = "false", "false"
                prefix = ""
            else:
                src = "g"
                due = "date('2026-09-01', '+' || (x % 60) || ' days')"
                issue = "date('2026-08-01', '+' || (x % 60) || ' days')"
                f, t_ = "0", "0"
                prefix = "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < :n) "
            amount = "(10000 + ((x % 50000) * 7919) % 50000)"
            s.execute(
                text(
                    f"INSERT INTO accounts ({_ACCOUNT_COLS}) {prefix}"
                    f"SELECT x, :org, 'A' || x, 'Debtor ' || x, 'debtor' || x || '@example.com', 'EUR', "
                    f"{f}, {f}, {f}, {f}, {f}, {f}, {f}, 'unassigned', 0, 0, {f}, "
                    f"{amount}, {amount}, x, {due}, 'outstanding', :now, :now FROM {src}"
                ),
                {"org": org_id, "n": n, "now": NOW_NAIVE},
            )
            s.execute(
                text(
                    f"INSERT INTO invoices ({_INVOICE_COLS}) {prefix}"
                    f"SELECT x, :org, x, 'I' || x, 'INV-' || x, 'EUR', {amount}, 0, {issue}, {due}, 'open', {t_}, :now, :now "
                    f"FROM {src}"
                ),
                {"org": org_id, "n": n, "now": NOW_NAIVE},
            )
            if pg:
                s.execute(text("SELECT setval('accounts_id_seq', :n), setval('invoices_id_seq', :n)"), {"n": n})
        analyze(url)
    finally:
        db.dispose()
    return time.monotonic() - t


def analyze(url: str, tables: tuple[str, ...] = ("accounts", "invoices", "queue_items", "execution_log")) -> None:
    if url.startswith("postgresql"):
        with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
            for table in tables:
                conn.execute(f"VACUUM ANALYZE {table}")
            # The set-up's writes are flushed now, not by a checkpoint during the timed part.
            conn.execute("CHECKPOINT")
    else:
        con = sqlite3.connect(url.removeprefix("sqlite:///"))
        con.execute("ANALYZE")
        con.close()


def setup_org(url: str, *, settings_patch: dict[str, Any] | None = None) -> int:
    from duecourse.db import Database
    from duecourse.db.migrate import upgrade
    from duecourse.tenancy import service as tenancy
    from duecourse.tenancy.principal import Principal

    upgrade(url)
    db = Database(url)
    try:
        with db.transaction() as session:
            org = tenancy.create_organization(session, name="Bench Receivables", timezone=ORG_TZ, base_currency="EUR", now=NOW)
            if settings_patch:
                tenancy.update_settings(session, principal=Principal.system(org.id), patch=settings_patch, now=NOW)
            return org.id
    finally:
        db.dispose()


def create_strategy_and_assign(url: str, org_id: int) -> tuple[int, int, float]:
    """One active strategy (two email stages with templates, amount_threshold 1, every day at 07:00)
    and assign_by_trigger over every account. Returns (strategy id, assigned, seconds of the assign)."""
    from duecourse.db import Database
    from duecourse.engine.assign import assign_by_trigger
    from duecourse.messaging.models import Template
    from duecourse.strategies.models import Stage, Strategy
    from duecourse.tenancy import service as tenancy
    from duecourse.tenancy.models import Organization

    db = Database(url)
    try:
        with db.transaction() as s:
            templates = []
            for name in ("Reminder", "Second reminder"):
                t = Template(
                    organization_id=org_id, name=name, channel="email", tone="standard",
                    subject="Invoice {{ carrying_invoice_number }} is overdue", body_text=BODY,
                    body_html="<p>" + BODY.replace("\n\n", "</p><p>") + "</p>", created_at=NOW, updated_at=NOW,
                )
                s.add(t)
                templates.append(t)
            s.flush()
            strategy = Strategy(
                organization_id=org_id, name="Bench email", type="standard", description="benchmark", active=True,
                multi_stage_handling="run_all_in_order", first_action_logic="standard", trigger_type="amount_threshold",
                trigger_amount=Decimal(1), priority=10, automation_time="07:00",
                automation_days="mon,tue,wed,thu,fri,sat,sun", created_at=NOW, updated_at=NOW,
            )
            strategy.stages = [
                Stage(position=0, action_type="email", timing_type="days_from_trigger", days=0, template_id=templates[0].id),
                Stage(position=1, action_type="email", timing_type="days_from_previous", days=3, template_id=templates[1].id),
            ]
            s.add(strategy)
            s.flush()
            sid = strategy.id
        t = time.monotonic()
        with db.transaction() as s:
            org = s.get(Organization, org_id)
            strategy = s.get(Strategy, sid)
            assigned = assign_by_trigger(s, strategy=strategy, org=org, rates=tenancy.get_settings(s, org_id).exchange_rates, now=NOW)
        took = time.monotonic() - t
    finally:
        db.dispose()
    analyze(url)
    return sid, assigned, took


def check_derived(url: str, org_id: int) -> int:
    """How many accounts refresh_accounts would change (0 expected). Run on small loads only."""
    from duecourse.db import Database
    from duecourse.ledger.derived import refresh_accounts
    from duecourse.tenancy import service as tenancy

    db = Database(url)
    cols = "id, status, collection_tab, balance, gross_open, carrying_invoice_id, carrying_due_date"
    try:
        with db.transaction() as s:
            before = s.execute(text(f"SELECT {cols} FROM accounts ORDER BY id")).all()
            refresh_accounts(s, organization_id=org_id, exclusions=tenancy.get_settings(s, org_id).exclusions, now=NOW)
            s.flush()
            after = s.execute(text(f"SELECT {cols} FROM accounts ORDER BY id")).all()
            s.rollback()
    finally:
        db.dispose()
    return sum(1 for a, b in zip(before, after) if tuple(a) != tuple(b)) + abs(len(before) - len(after))


class StatementProfile:
    """Wall time per SQL statement (by its first words), via SQLAlchemy cursor events."""

    def __init__(self, engine: Any) -> None:
        self.totals: dict[str, list[float]] = {}
        self._starts: list[float] = []
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn, cursor, statement, parameters, context, executemany):
        self._starts.append(time.monotonic())

    def _after(self, conn, cursor, statement, parameters, context, executemany):
        took = time.monotonic() - self._starts.pop()
        key = " ".join(statement.split())[:110]
        entry = self.totals.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += took

    def top(self, n: int = 15) -> list[dict[str, Any]]:
        rows = sorted(self.totals.items(), key=lambda kv: -kv[1][1])[:n]
        return [{"statement": k, "calls": int(v[0]), "seconds": round(v[1], 3)} for k, v in rows]


def later(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def backend_pids(db: Any) -> set[int]:
    """The PostgreSQL server processes of ``db``'s connections (filled in as they connect; the pooled
    connection a run reuses is opened here, so its process is known before the run starts)."""
    from sqlalchemy import event

    pids: set[int] = set()
    if db.dialect != "postgresql":
        return pids  # SQLite runs in the worker's own process

    @event.listens_for(db.engine, "connect")
    def _backend(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        with dbapi_conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pids.add(cur.fetchone()[0])

    with db.engine.connect():
        pass
    return pids


def backend_cpu_seconds(pids: set[int]) -> float:
    """utime + stime of the given server processes (Linux: /proc; they run on this machine)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total
