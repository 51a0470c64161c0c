"""Import benchmark: a synthetic portfolio through ``duecourse import``, on PostgreSQL and SQLite.

    .venv/bin/python bench/import_bench.py                     # 1,000,000 accounts, ~3,000,000 invoices
    .venv/bin/python bench/import_bench.py --accounts 100000   # smaller

What it does:

1. Generates the portfolio with ``bench/portfolio.py`` (or reuses the cached one in ``--cache``).
2. Creates a fresh PostgreSQL database, migrates it and creates an organization.
3. Runs the real CLI, ``duecourse import accounts …`` then ``duecourse import invoices …`` (then
   payments, reported apart), each in a child process, timing it from spawn to exit (so Python start-up
   and the migration check are included) and reading the child's peak RSS from ``wait4``.
4. The floor: PostgreSQL's own ``COPY … FROM STDIN (FORMAT csv)`` of the same files into unindexed
   tables with typed columns, in the same database, and the ratio of our time to it.
5. The same imports into a fresh SQLite file.
6. Prints the machine context and writes everything to ``bench/results/import-<accounts>.json``.

The PostgreSQL database (``--db-name``, default ``duecourse_bench``) is kept for ``list_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import portfolio

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
KINDS = ("accounts", "invoices", "payments")

FLOOR_TYPES = {
    "accounts": (
        "external_id text, name text, email text, phone text, whatsapp text, timezone text, language text, "
        "currency text, score smallint, tags text, opt_out_email boolean, opt_out_sms boolean, "
        "opt_out_whatsapp boolean, opt_out_voice boolean, blocked boolean, blocked_reason text, paused boolean"
    ),
    "invoices": (
        "external_id text, account_external_id text, number text, currency text, total numeric, "
        "amount_paid numeric, issue_date date, due_date date, status text, disputed boolean"
    ),
}


def ensure_portfolio(cache: Path, accounts: int, seed: int) -> tuple[Path, dict[str, int]]:
    out = cache / f"portfolio-{accounts}-s{seed}"
    marker = out / "counts.json"
    if marker.exists():
        return out, json.loads(marker.read_text())
    print(f"generating {accounts:,} accounts into {out} …", flush=True)
    t = time.monotonic()
    counts = portfolio.generate(out, accounts=accounts, seed=seed, progress=True)
    marker.write_text(json.dumps(counts))
    print(f"generated in {time.monotonic() - t:.0f}s: {counts}", flush=True)
    return out, counts


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    with psycopg.connect(PG_ADMIN) as conn:
        pg_version = conn.execute("SHOW server_version").fetchone()[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "sqlite": sqlite3.sqlite_version,
        "os": platform.platform(),
    }


def fresh_pg(db_name: str) -> str:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{db_name}"')
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{db_name}"


def setup_org(url: str) -> int:
    """Migrate and create the organization the files are imported into."""
    from datetime import UTC, datetime

    from duecourse.db import Database
    from duecourse.db.migrate import upgrade
    from duecourse.tenancy import service as tenancy

    upgrade(url)
    db = Database(url)
    try:
        with db.transaction() as session:
            org = tenancy.create_organization(
                session, name="Bench Receivables", timezone="Europe/Madrid", base_currency="EUR", now=datetime.now(UTC)
            )
            return org.id
    finally:
        db.dispose()


def run_cli_import(url: str, org_id: int, kind: str, path: Path) -> dict[str, Any]:
    """``duecourse import KIND FILE`` in a child process: wall time, exit code, peak RSS (wait4)."""
    import tempfile

    exe = Path(sys.executable).parent / "duecourse"
    env = {**os.environ, "DUECOURSE_DATABASE_URL": url}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errout:
        t = time.monotonic()
        proc = subprocess.Popen(
            [str(exe), "import", kind, str(path), "--organization", str(org_id), "--no-progress"],
            env=env,
            stdout=out,
            stderr=errout,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        took = time.monotonic() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        errout.seek(0)
        return {
            "seconds": round(took, 2),
            "exit_code": proc.returncode,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "stdout": out.read().decode(errors="replace")[-3000:],
            "stderr": errout.read().decode(errors="replace")[-3000:],
        }


def floor_copy(url: str, kind: str, path: Path) -> float:
    """PostgreSQL's own COPY of the same CSV into an unindexed table with typed columns."""
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        conn.execute(f"DROP TABLE IF EXISTS floor_{kind}")
        conn.execute(f"CREATE TABLE floor_{kind} ({FLOOR_TYPES[kind]})")
        conn.commit()
        t = time.monotonic()
        with (
            conn.cursor() as cur,
            open(path, "rb") as f,
            cur.copy(f"COPY floor_{kind} FROM STDIN (FORMAT csv, HEADER true)") as copy,
        ):
            while chunk := f.read(1 << 20):
                copy.write(chunk)
        conn.commit()
        took = time.monotonic() - t
        conn.execute(f"DROP TABLE floor_{kind}")
        conn.commit()
    return took


def import_all(label: str, url: str, files: Path, counts: dict[str, int]) -> dict[str, Any]:
    org_id = setup_org(url)
    results: dict[str, Any] = {}
    for kind in KINDS:
        print(f"[{label}] duecourse import {kind} ({counts[kind]:,} rows) …", flush=True)
        r = run_cli_import(url, org_id, kind, files / f"{kind}.csv")
        if r["exit_code"] != 0:
            print(r["stdout"], r["stderr"], sep="\n")
            raise SystemExit(f"[{label}] import of {kind} failed with exit code {r['exit_code']}")
        r["rows"] = counts[kind]
        r["rows_per_s"] = round(counts[kind] / r["seconds"])
        print(f"[{label}]   {r['seconds']:.1f}s  {r['rows_per_s']:,} rows/s  peak RSS {r['peak_rss_mb']} MB", flush=True)
        results[kind] = r
    main_rows = counts["accounts"] + counts["invoices"]
    main_secs = results["accounts"]["seconds"] + results["invoices"]["seconds"]
    results["overall"] = {
        "rows": main_rows,
        "seconds": round(main_secs, 2),
        "rows_per_s": round(main_rows / main_secs),
        "peak_rss_mb": max(results[k]["peak_rss_mb"] for k in KINDS),
    }
    results["organization_id"] = org_id
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Import benchmark (see the module docstring)")
    p.add_argument("--accounts", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache", type=Path, default=HERE / ".cache")
    p.add_argument("--db-name", default="duecourse_bench")
    p.add_argument("--skip-sqlite", action="store_true")
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)

    files, counts = ensure_portfolio(args.cache, args.accounts, args.seed)
    ctx = machine()
    print("machine:", json.dumps(ctx), flush=True)
    report: dict[str, Any] = {"machine": ctx, "accounts": args.accounts, "seed": args.seed, "counts": counts}

    pg_url = fresh_pg(args.db_name).replace("postgresql://", "postgresql+psycopg://")
    report["postgresql"] = import_all("postgresql", pg_url, files, counts)

    floor = {kind: floor_copy(pg_url, kind, files / f"{kind}.csv") for kind in ("accounts", "invoices")}
    floor_total = sum(floor.values())
    ours = report["postgresql"]["overall"]["seconds"]
    report["floor"] = {
        "accounts_seconds": round(floor["accounts"], 2),
        "invoices_seconds": round(floor["invoices"], 2),
        "seconds": round(floor_total, 2),
        "rows_per_s": round(report["postgresql"]["overall"]["rows"] / floor_total),
        "ratio_ours_to_floor": round(ours / floor_total, 2),
    }
    print(
        f"[floor] COPY of the same CSVs into unindexed tables: {floor_total:.1f}s "
        f"({report['floor']['rows_per_s']:,} rows/s); ours/floor = {report['floor']['ratio_ours_to_floor']}",
        flush=True,
    )

    if not args.skip_sqlite:
        sqlite_path = args.cache / f"bench-{args.accounts}.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(str(sqlite_path) + suffix).unlink(missing_ok=True)
        report["sqlite"] = import_all("sqlite", f"sqlite:///{sqlite_path}", files, counts)

    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"import-{args.accounts}.json"
    for side in ("postgresql", "sqlite"):
        for kind in KINDS:
            if side in report:
                report[side][kind].pop("stdout", None)
                report[side][kind].pop("stderr", None)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    print(f"results written to {out}")


def print_summary(r: dict[str, Any]) -> None:
    m = r["machine"]
    print()
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
          f"PostgreSQL {m['postgresql']}, SQLite {m['sqlite']}")
    print(f"portfolio: {r['counts']['accounts']:,} accounts, {r['counts']['invoices']:,} invoices, "
          f"{r['counts']['payments']:,} payments (seed {r['seed']})")
    for side in ("postgresql", "sqlite"):
        if side not in r:
            continue
        s = r[side]
        print(f"{side}:")
        for kind in KINDS:
            k = s[kind]
            print(f"  {kind:9} {k['rows']:>10,} rows  {k['seconds']:8.1f}s  {k['rows_per_s']:>9,} rows/s  "
                  f"peak RSS {k['peak_rss_mb']} MB")
        o = s["overall"]
        print(f"  overall (accounts + invoices) {o['rows']:,} rows in {o['seconds']:.1f}s = {o['rows_per_s']:,} rows/s; "
              f"peak RSS {o['peak_rss_mb']} MB")
    f = r["floor"]
    print(f"floor (PostgreSQL COPY, unindexed): {f['seconds']:.1f}s = {f['rows_per_s']:,} rows/s; "
          f"ours/floor = {f['ratio_ours_to_floor']}x")


if __name__ == "__main__":
    main()
