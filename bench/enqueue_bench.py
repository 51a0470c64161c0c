"""Enqueue benchmark: one enqueue pass over N freshly assigned accounts, against an INSERT … SELECT floor.

    .venv/bin/python bench/enqueue_bench.py                      # 1,000,000 accounts (PostgreSQL), 200,000 (SQLite)
    .venv/bin/python bench/enqueue_bench.py --accounts 100000 --sqlite-accounts 100000

What it does, on PostgreSQL (a fresh database, ``--db-name``, dropped at the end unless ``--keep``) and
then on a fresh SQLite file:

1. Migrates, creates one organization and loads N accounts with one open invoice each straight in SQL
   (``engine_common.load_accounts``), then ``VACUUM ANALYZE``.
2. Creates one active strategy (two email stages with templates, trigger ``amount_threshold`` 1,
   automation every day at 07:00) and runs ``assign_by_trigger`` over all accounts (committed, timed
   apart and reported as ``assign_seconds``: opening the cases, which also chooses each case's first
   stage and writes its ``assigned`` log entry), then ``VACUUM ANALYZE``.
3. The measured part, in a child process: ``enqueue(session, organization_id, now, strategy_id,
   cause="bench")`` in one transaction, committed. The child reports the time of the call and of the
   commit (and a per-statement profile); the parent times spawn to exit and reads the child's peak RSS
   from ``wait4``.
4. The floor: ``TRUNCATE queue_items CASCADE`` (the dependent tables are empty; on SQLite ``DELETE`` with
   foreign keys off), ``VACUUM ANALYZE``,
   then one bare ``INSERT INTO queue_items (…) SELECT … FROM accounts`` of the same rows into the real
   table (all its indexes and foreign keys), committed. Also the same into an unindexed copy
   (``CREATE TABLE … (LIKE queue_items)``, no indexes, no constraints) for reference.
5. Prints both and the ratio, and writes ``bench/results/enqueue-<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import engine_common as ec

FLOOR_SELECT = (
    "SELECT organization_id, id, strategy_id, campaign_id, case_number, 0, 'email', :at, 'pending', 0, 3, "
    "'floor', 'standard', {false}, :at, :at FROM accounts WHERE organization_id = :org AND strategy_id = :sid"
)
FLOOR_COLS = (
    "organization_id, account_id, strategy_id, campaign_id, case_number, stage_index, action, scheduled_at, status, "
    "attempt, max_attempts, batch_id, tone, is_callback, created_at, updated_at"
)


def child(url: str, org_id: int, strategy_id: int, profile: bool, pg_set: list[str]) -> None:
    """The measured part: one enqueue pass in one transaction. Prints a JSON line."""
    from sqlalchemy import text

    from duecourse.db import Database
    from duecourse.engine.enqueue import enqueue

    db = Database(url)
    prof = ec.StatementProfile(db.engine) if profile else None
    t0 = time.monotonic()
    with db.sessionmaker() as session:
        for setting in pg_set:  # diagnostic only (--pg-set): session settings, e.g. enable_nestloop=off
            name, value = setting.split("=", 1)
            session.execute(text(f"SET {name} = {value}"))
        result = enqueue(session, organization_id=org_id, now=ec.NOW, strategy_id=strategy_id, cause="bench")
        t1 = time.monotonic()
        session.commit()
    t2 = time.monotonic()
    db.dispose()
    out = {"result": result.as_dict(), "enqueue_seconds": round(t1 - t0, 3), "commit_seconds": round(t2 - t1, 3),
           "in_process_seconds": round(t2 - t0, 3)}
    if prof:
        out["profile"] = prof.top()
    print("RESULT " + json.dumps(out), flush=True)


def run_child(url: str, org_id: int, strategy_id: int, profile: bool, pg_set: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", url, str(org_id), str(strategy_id)] + (["--profile"] if profile else [])
    cmd += [f"--set={x}" for x in pg_set]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        took = time.monotonic() - t
        out.seek(0)
        err.seek(0)
        text_out, text_err = out.read().decode(), err.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(text_out, text_err, sep="\n")
        raise SystemExit(f"enqueue child failed with exit code {code}")
    line = next(ln for ln in text_out.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    r["wall_seconds"] = round(took, 3)
    r["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    return r


def counts(url: str) -> dict[str, int]:
    from sqlalchemy import text

    from duecourse.db import Database

    db = Database(url)
    try:
        with db.transaction() as s:
            return {
                "queue_items": s.scalar(text("SELECT count(*) FROM queue_items")),
                "queue_items_pending": s.scalar(text("SELECT count(*) FROM queue_items WHERE status = 'pending'")),
                "execution_log": s.scalar(text("SELECT count(*) FROM execution_log")),
                "execution_log_enqueued": s.scalar(text("SELECT count(*) FROM execution_log WHERE event = 'enqueued'")),
            }
    finally:
        db.dispose()


def floor(url: str, org_id: int, strategy_id: int) -> dict[str, Any]:
    """One bare INSERT … SELECT of the same rows: into the real (truncated) table, and into an unindexed copy."""
    from sqlalchemy import text

    from duecourse.db import Database

    pg = url.startswith("postgresql")
    false = "false" if pg else "0"
    select_sql = FLOOR_SELECT.format(false=false)
    params = {"at": ec.NOW_NAIVE, "org": org_id, "sid": strategy_id}
    db = Database(url)
    out: dict[str, Any] = {}
    try:
        with db.transaction() as s:
            s.execute(text("CREATE TABLE floor_queue_items AS SELECT * FROM queue_items WHERE false" if pg
                           else "CREATE TABLE floor_queue_items AS SELECT * FROM queue_items WHERE 0"))
        # Into an unindexed copy (no indexes, no constraints, no defaults: ids are not needed here).
        t = time.monotonic()
        with db.transaction() as s:
            n = s.execute(text(f"INSERT INTO floor_queue_items ({FLOOR_COLS}) {select_sql}"), params).rowcount
        out["unindexed_copy"] = {"rows": n, "seconds": round(time.monotonic() - t, 3)}
        with db.transaction() as s:
            s.execute(text("DROP TABLE floor_queue_items"))
            if pg:
                s.execute(text("TRUNCATE queue_items CASCADE"))
        if not pg:
            # Emptied with foreign keys off: with them on, SQLite checks every deleted row against the
            # unindexed queue_items.retry_of_id (a full scan per row, quadratic). Nothing refers to them.
            con = sqlite3.connect(url.removeprefix("sqlite:///"))
            con.execute("PRAGMA foreign_keys = OFF")
            con.execute("DELETE FROM queue_items")
            con.commit()
            con.close()
        ec.analyze(url)
        t = time.monotonic()
        with db.transaction() as s:
            n = s.execute(text(f"INSERT INTO queue_items ({FLOOR_COLS}) {select_sql}"), params).rowcount
        out["real_table"] = {"rows": n, "seconds": round(time.monotonic() - t, 3)}
    finally:
        db.dispose()
    return out


def run_side(label: str, url: str, n: int, profile: bool, pg_set: list[str] | None = None) -> dict[str, Any]:
    print(f"[{label}] migrate, organization, {n:,} accounts + invoices …", flush=True)
    org_id = ec.setup_org(url)
    load_s = ec.load_accounts(url, org_id, n)
    print(f"[{label}]   loaded in {load_s:.1f}s", flush=True)
    if n <= 20_000:
        changed = ec.check_derived(url, org_id)
        print(f"[{label}]   refresh_accounts would change {changed} accounts", flush=True)
    sid, assigned, assign_s = ec.create_strategy_and_assign(url, org_id)
    print(f"[{label}]   assign_by_trigger: {assigned:,} accounts in {assign_s:.1f}s", flush=True)
    r = run_child(url, org_id, sid, profile, pg_set or [])
    after = counts(url)
    print(f"[{label}] enqueue: {r['result']['enqueued']:,} items in {r['in_process_seconds']:.1f}s in process "
          f"(call {r['enqueue_seconds']:.1f}s + commit {r['commit_seconds']:.1f}s), {r['wall_seconds']:.1f}s wall "
          f"from spawn; peak RSS {r['peak_rss_mb']} MB", flush=True)
    print(f"[{label}]   rows now: {after}", flush=True)
    ec.analyze(url)
    fl = floor(url, org_id, sid)
    ratio = r["in_process_seconds"] / fl["real_table"]["seconds"]
    print(f"[{label}] floor: INSERT … SELECT into queue_items (truncated, indexed) {fl['real_table']['rows']:,} rows "
          f"in {fl['real_table']['seconds']:.2f}s; into an unindexed copy {fl['unindexed_copy']['seconds']:.2f}s; "
          f"ours/floor = {ratio:.2f}x", flush=True)
    return {"accounts": n, "organization_id": org_id, "strategy_id": sid, "load_seconds": round(load_s, 2),
            "assigned": assigned, "assign_seconds": round(assign_s, 2), "enqueue": r, "rows_after": after,
            "floor": fl, "ratio_ours_to_floor": round(ratio, 2),
            "ratio_wall_to_floor": round(r["wall_seconds"] / fl["real_table"]["seconds"], 2)}


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "--profile" in sys.argv,
              [a.removeprefix("--set=") for a in sys.argv if a.startswith("--set=")])
        return
    p = argparse.ArgumentParser(description="Enqueue benchmark (see the module docstring)")
    p.add_argument("--accounts", type=int, default=1_000_000, help="PostgreSQL accounts; 0 to skip PostgreSQL")
    p.add_argument("--sqlite-accounts", type=int, default=200_000, help="0 to skip SQLite")
    p.add_argument("--db-name", default="duecourse_enqueue_bench")
    p.add_argument("--keep", action="store_true", help="keep the PostgreSQL database and the SQLite file")
    p.add_argument("--no-profile", action="store_true", help="no per-statement profile in the child")
    p.add_argument("--pg-set", action="append", default=[], metavar="NAME=VALUE",
                   help="diagnostic: a PostgreSQL session setting for the measured pass only (e.g. enable_nestloop=off)")
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)

    ctx = ec.machine()
    print("machine:", json.dumps(ctx), flush=True)
    report: dict[str, Any] = {"machine": ctx, "now": ec.NOW.isoformat(),
                              "command": "bench/enqueue_bench.py " + " ".join(sys.argv[1:])}
    if args.accounts:  # --accounts 0: SQLite only
        url = ec.fresh_pg(args.db_name)
        try:
            report["postgresql"] = run_side("postgresql", url, args.accounts, not args.no_profile, args.pg_set)
            report["postgresql"]["pg_set"] = args.pg_set
        finally:
            if not args.keep:
                ec.drop_pg(args.db_name)
    if args.sqlite_accounts:
        path = Path(tempfile.gettempdir()) / f"duecourse-enqueue-bench-{args.sqlite_accounts}.sqlite"
        url = ec.fresh_sqlite(path)
        try:
            report["sqlite"] = run_side("sqlite", url, args.sqlite_accounts, not args.no_profile)
        finally:
            if not args.keep:
                ec.drop_sqlite(path)
    report["machine"]["load_average_end"] = os.getloadavg()
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / (f"enqueue-{args.accounts or 'sqlite-' + str(args.sqlite_accounts)}" + ("-" + "-".join(x.replace("=", "_") for x in args.pg_set) if args.pg_set else "") + ".json")
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    for side in ("postgresql", "sqlite"):
        if side in report:
            s = report[side]
            e = s["enqueue"]
            print(f"{side}: {s['accounts']:,} accounts; enqueue {e['in_process_seconds']:.2f}s in process "
                  f"({e['wall_seconds']:.2f}s from spawn), peak RSS {e['peak_rss_mb']} MB; floor "
                  f"{s['floor']['real_table']['seconds']:.2f}s; ours/floor {s['ratio_ours_to_floor']}x")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
