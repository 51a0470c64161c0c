"""Where an import's time goes, in process: per-statement wall time, and CPU of both sides.

    .venv/bin/python bench/import_phases.py --accounts 200000            # PostgreSQL
    .venv/bin/python bench/import_phases.py --accounts 200000 --sqlite   # SQLite

Uses the portfolio of ``bench/portfolio.py`` (cached like ``import_bench.py``), a fresh database,
and ``run_import`` directly. For each file it prints the wall time, the Python process's CPU time
and (PostgreSQL, when the server runs on this machine) the server backend's CPU time, read from
``/proc``: on a shared machine CPU seconds move much less with the load than wall seconds. Then
the slowest SQL statements (SQLAlchemy cursor events; ``COPY`` through the driver is part of
"the rest").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import import_bench  # noqa: E402
from sqlalchemy import event, text  # noqa: E402

from duecourse.db import Database  # noqa: E402
from duecourse.ledger.imports import run_import  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--accounts", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache", type=Path, default=HERE / ".cache")
    p.add_argument("--db-name", default="duecourse_import_phases")
    p.add_argument("--sqlite", action="store_true")
    p.add_argument("--kinds", default="accounts,invoices")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--explain", type=int, default=0, help="auto_explain (analyze) statements slower than this many ms")
    p.add_argument("--no-pipeline", action="store_true", help="PostgreSQL: the general path only")
    p.add_argument("--twice", action="store_true", help="import each file a second time (the idempotent re-import)")
    args = p.parse_args(argv)

    if args.no_pipeline:
        from duecourse.ledger import imports

        imports._PIPELINED = ()
    files, counts = import_bench.ensure_portfolio(args.cache, args.accounts, args.seed)
    if args.sqlite:
        path = args.cache / f"phases-{args.accounts}.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        url = f"sqlite:///{path}"
    else:
        url = import_bench.fresh_pg(args.db_name).replace("postgresql://", "postgresql+psycopg://")
    org_id = import_bench.setup_org(url)
    print(f"load average before: {os.getloadavg()}")
    kinds = args.kinds.split(",")
    if args.twice:
        kinds = [k for k in kinds for _ in range(2)]
    total_wall = 0.0
    main_rows = 0
    for kind in kinds:
        db = Database(url)
        stmts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        stmt_cpu = [0.0]

        @event.listens_for(db.engine, "before_cursor_execute")
        def before(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            conn.info["t0"] = time.perf_counter()
            conn.info["c0"] = time.process_time()

        @event.listens_for(db.engine, "after_cursor_execute")
        def after(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            s = stmts[" ".join(statement.split())[:150]]
            s[0] += time.perf_counter() - conn.info.pop("t0")
            s[1] += 1
            stmt_cpu[0] += time.process_time() - conn.info.pop("c0")

        with db.transaction() as session:
            pid = None
            if not args.sqlite:
                pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
                if args.explain:
                    raw = session.connection().connection.driver_connection
                    raw.add_notice_handler(lambda d: print("NOTICE:", d.message_primary, flush=True))
                    session.execute(text("LOAD 'auto_explain'"))
                    session.execute(text(f"SET auto_explain.log_min_duration = {args.explain}"))
                    session.execute(text("SET auto_explain.log_analyze = on"))
                    session.execute(text("SET auto_explain.log_triggers = on"))
                    session.execute(text("SET client_min_messages = log"))
            cpu0, b0, t0 = time.process_time(), backend_cpu(pid), time.perf_counter()
            with open(files / f"{kind}.csv", "rb") as f:
                report = run_import(session, organization_id=org_id, kind=kind, stream=f, now=datetime.now(UTC))
            t_import = time.perf_counter()
        wall = time.perf_counter() - t0
        commit = time.perf_counter() - t_import
        cpu, bcpu = time.process_time() - cpu0, backend_cpu(pid) - b0
        db.dispose()
        sql_time = sum(v[0] for v in stmts.values())
        print(
            f"\n{kind}: {report.rows:,} rows (inserted {report.inserted:,}, updated {report.updated:,}) "
            f"wall {wall:.1f}s = {report.rows / wall:,.0f} rows/s (commit {commit:.1f}s); "
            f"python CPU {cpu:.1f}s (in SQL statements {stmt_cpu[0]:.1f}s); backend CPU {bcpu:.1f}s; SQL statements {sql_time:.1f}s; "
            f"the rest (read, validate, COPY) {wall - commit - sql_time:.1f}s; load {os.getloadavg()[0]:.2f}"
        )
        for stmt, (secs, n) in sorted(stmts.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"  {secs:7.2f}s  x{n:<3} {stmt}")
        if kind in ("accounts", "invoices"):
            total_wall += wall
            main_rows += report.rows
    print(f"\noverall {main_rows:,} rows in {total_wall:.1f}s = {main_rows / total_wall:,.0f} rows/s; "
          f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
