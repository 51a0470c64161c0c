"""Dispatch benchmark: M due email items through ``run_due`` with 2 worker processes, against procrastinate.

    .venv/bin/python bench/dispatch_bench.py                     # 200,000 items (PostgreSQL), 20,000 (SQLite)
    .venv/bin/python bench/dispatch_bench.py --items 50000 --sqlite-items 10000

What it does:

1. A fresh PostgreSQL database (``--db-name``, dropped at the end unless ``--keep``): migrate, one
   organization whose settings are patched through ``tenancy.service.update_settings`` so nothing is
   refused (overall frequency limit 1,000,000 a day, email hours 00:00–24:00 every day), M accounts
   with email addresses and one open invoice each (``engine_common.load_accounts``), one strategy with
   two email stages and templates, ``assign_by_trigger`` and one ``enqueue`` pass: M pending items due
   at NOW. ``VACUUM ANALYZE``, then ``CHECKPOINT`` (the set-up's writes are not flushed during
   the timed part).
2. The measured part: ``--workers`` (2) child processes, each running
   ``run_due(Database(url), now=NOW, worker=…, batch=--batch)`` until no item is left (re-validation,
   dispatch rules with the frequency-limit query, template rendering, the sandbox send, the
   interaction, the log and the case advance: everything in ``run_due``). Each child reports when it
   started and finished working (after its imports); the rate is M over the span from the first start to
   the last finish. The wall time from spawn to the last exit is reported too.
3. Checks: every item completed, one interaction and one outbox message per item.
4. procrastinate (installed into the venv with pip when missing, not a project dependency): its own
   database (``duecourse_procrastinate_bench``), schema applied with its schema manager, M no-op jobs
   deferred in bulk (``Task.batch_defer``, not timed), then ``--workers`` child processes each running
   ``app.run_worker(queues=["bench"], wait=False, concurrency=1)``, timed the same way.
5. SQLite: the same set-up in a fresh file with ``--sqlite-items`` items and one worker.
6. Prints the rates and their ratio and writes ``bench/results/dispatch-<M>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import engine_common as ec

SETTINGS_PATCH = {
    "messages": {"payment_link": "https://pay.example.com/{account_external_id}?invoice={invoice_number}"},
    "dispatch": {
        "frequency_limits": {"overall": {"per_day": 1_000_000, "per_week": None}},
        "allowed_hours": {"email": {"start": "00:00", "end": "24:00", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}},
    }
}
PROCRASTINATE_DB = "duecourse_procrastinate_bench"


# --- children -----------------------------------------------------------------------------------

def child_ours(url: str, worker: str, batch: int, profile: bool) -> None:
    from duecourse.db import Database
    from duecourse.engine.dispatch import run_due
    from duecourse.engine.runner import freeze_startup_heap

    db = Database(url)
    backends = ec.backend_pids(db)  # this worker's PostgreSQL server processes (their CPU time, Linux)
    prof = ec.StatementProfile(db.engine) if profile else None
    if os.environ.get("BENCH_NO_FREEZE") != "1":
        freeze_startup_heap()  # as `duecourse worker` does
    start = time.time()
    cpu0, server0 = time.process_time(), ec.backend_cpu_seconds(backends)
    counts = run_due(db, now=ec.NOW, worker=worker, batch=batch)
    end = time.time()
    out: dict[str, Any] = {"worker": worker, "start": start, "end": end, "counts": counts,
                           "cpu_seconds": round(time.process_time() - cpu0, 2),
                           "server_cpu_seconds": round(ec.backend_cpu_seconds(backends) - server0, 2)}
    if prof:
        out["sql_seconds"] = round(sum(v[1] for v in prof.totals.values()), 2)
        out["sql_statements"] = int(sum(v[0] for v in prof.totals.values()))
        out["profile"] = prof.top(20)
    db.dispose()
    print("RESULT " + json.dumps(out), flush=True)


def child_procrastinate(worker: str) -> None:
    import logging

    logging.disable(logging.CRITICAL)
    from procrastinate_app import app

    with app.open():
        start = time.time()
        cpu0 = time.process_time()
        app.run_worker(queues=["bench"], wait=False, concurrency=1, name=worker, install_signal_handlers=False)
        end = time.time()
    print("RESULT " + json.dumps({"worker": worker, "start": start, "end": end,
                                  "cpu_seconds": round(time.process_time() - cpu0, 2)}), flush=True)


def spawn_workers(args_list: list[list[str]], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start the children together; wait for all; wall time, per-child results and peak RSS."""
    procs = []
    t = time.monotonic()
    for a in args_list:
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115 (closed after the child exits)
        procs.append((subprocess.Popen([sys.executable, __file__, *a], stdout=out, stderr=err, env=env), out, err))
    results = []
    pending = {p.pid: (p, out, err) for p, out, err in procs}
    while pending:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in pending:
            continue
        _proc, out, err = pending.pop(pid)
        out.seek(0)
        err.seek(0)
        text_out, text_err = out.read().decode(), err.read().decode()
        out.close()
        err.close()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            print(text_out, text_err[-5000:], sep="\n")
            raise SystemExit(f"worker {pid} failed with exit code {code}")
        line = next(ln for ln in text_out.splitlines() if ln.startswith("RESULT "))
        r = json.loads(line[len("RESULT "):])
        r["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
        results.append(r)
    wall = time.monotonic() - t
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"wall_seconds": round(wall, 3), "working_seconds": round(span, 3), "workers": results}


# --- ours -----------------------------------------------------------------------------------------

def prepare_ours(label: str, url: str, m: int) -> dict[str, Any]:
    from duecourse.db import Database
    from duecourse.engine.enqueue import enqueue

    print(f"[{label}] migrate, organization (settings patched), {m:,} accounts …", flush=True)
    org_id = ec.setup_org(url, settings_patch=SETTINGS_PATCH)
    load_s = ec.load_accounts(url, org_id, m)
    sid, assigned, assign_s = ec.create_strategy_and_assign(url, org_id)
    db = Database(url)
    t = time.monotonic()
    with db.transaction() as s:
        res = enqueue(s, organization_id=org_id, now=ec.NOW, strategy_id=sid, cause="bench")
    enqueue_s = time.monotonic() - t
    db.dispose()
    ec.analyze(url)
    print(f"[{label}]   loaded {load_s:.1f}s, assigned {assigned:,} in {assign_s:.1f}s, enqueued {res.enqueued:,} "
          f"in {enqueue_s:.1f}s", flush=True)
    if res.enqueued != m:
        raise SystemExit(f"[{label}] expected {m} items, enqueued {res.enqueued}")
    return {"organization_id": org_id, "strategy_id": sid, "load_seconds": round(load_s, 2),
            "assign_seconds": round(assign_s, 2), "enqueue_seconds": round(enqueue_s, 2)}


def check_ours(url: str) -> dict[str, Any]:
    from sqlalchemy import text

    from duecourse.db import Database

    db = Database(url)
    try:
        with db.transaction() as s:
            status = dict(s.execute(text("SELECT status, count(*) FROM queue_items WHERE stage_index = 0 GROUP BY status")).all())
            return {
                "stage0_items_by_status": status,
                "interactions": s.scalar(text("SELECT count(*) FROM interactions")),
                "sandbox_outbox": s.scalar(text("SELECT count(*) FROM sandbox_outbox")),
                "pending_stage1": s.scalar(text("SELECT count(*) FROM queue_items WHERE stage_index = 1 AND status = 'pending'")),
                "accounts_next_stage_1": s.scalar(text("SELECT count(*) FROM accounts WHERE case_next_stage = 1")),
            }
    finally:
        db.dispose()


def run_ours(label: str, url: str, m: int, workers: int, batch: int, profile: bool) -> dict[str, Any]:
    prep = prepare_ours(label, url, m)
    print(f"[{label}] run_due with {workers} worker process(es), batch {batch} …", flush=True)
    r = spawn_workers([["--child-ours", url, f"w{i}", str(batch)] + (["--profile"] if profile else []) for i in range(workers)])
    done = sum(sum(w["counts"].values()) for w in r["workers"])
    check = check_ours(url)
    r["items"] = m
    r["handled"] = done
    r["items_per_s"] = round(m / r["working_seconds"])
    r["items_per_s_wall"] = round(m / r["wall_seconds"])
    print(f"[{label}]   {m:,} items in {r['working_seconds']:.1f}s working ({r['wall_seconds']:.1f}s from spawn): "
          f"{r['items_per_s']:,} items/s ({r['items_per_s_wall']:,}/s wall); "
          f"per worker {[w['counts'] for w in r['workers']]}, peak RSS {[w['peak_rss_mb'] for w in r['workers']]} MB", flush=True)
    if label == "postgresql" and all("server_cpu_seconds" in w for w in r["workers"]):
        worker_cpu = sum(w["cpu_seconds"] for w in r["workers"])
        server_cpu = sum(w["server_cpu_seconds"] for w in r["workers"])
        r["cpu_ms_per_item"] = {"workers": round(1000 * worker_cpu / m, 3), "server": round(1000 * server_cpu / m, 3)}
        print(f"[{label}]   CPU per item: workers {1000 * worker_cpu / m:.3f} ms, their PostgreSQL server processes "
              f"{1000 * server_cpu / m:.3f} ms (of {2 * r['working_seconds'] * 1000 / m:.3f} ms of two cores)", flush=True)
    print(f"[{label}]   check: {check}", flush=True)
    return {**prep, **r, "check": check}


# --- procrastinate ----------------------------------------------------------------------------------

def ensure_procrastinate() -> str:
    if importlib.util.find_spec("procrastinate") is None:
        print("installing procrastinate into the venv (pip) …", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "procrastinate"], check=True)
    from importlib.metadata import version

    return version("procrastinate")


def run_procrastinate(m: int, workers: int, keep: bool) -> dict[str, Any]:
    version = ensure_procrastinate()
    ec.fresh_pg(PROCRASTINATE_DB)
    dsn = f"postgresql://postgres@127.0.0.1:5432/{PROCRASTINATE_DB}"
    env = {**os.environ, "PROCRASTINATE_BENCH_DSN": dsn}
    os.environ["PROCRASTINATE_BENCH_DSN"] = dsn
    import logging

    logging.disable(logging.CRITICAL)
    from procrastinate_app import app, noop

    try:
        with app.open():
            app.schema_manager.apply_schema()
            t = time.monotonic()
            chunk = 10_000
            for i in range(0, m, chunk):
                noop.batch_defer(*[{} for _ in range(min(chunk, m - i))])
            defer_s = time.monotonic() - t
        ec.analyze("postgresql+psycopg://postgres@127.0.0.1:5432/" + PROCRASTINATE_DB, ("procrastinate_jobs",))
        print(f"[procrastinate {version}] {m:,} no-op jobs deferred in {defer_s:.1f}s; {workers} worker process(es) …", flush=True)
        r = spawn_workers([["--child-procrastinate", f"p{i}"] for i in range(workers)], env=env)
        import psycopg

        with psycopg.connect(dsn) as conn:
            status = dict(conn.execute("SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY status").fetchall())
        r.update(version=version, items=m, defer_seconds=round(defer_s, 2), jobs_by_status=status,
                 items_per_s=round(m / r["working_seconds"]), items_per_s_wall=round(m / r["wall_seconds"]))
        print(f"[procrastinate]   {m:,} jobs in {r['working_seconds']:.1f}s working ({r['wall_seconds']:.1f}s from spawn): "
              f"{r['items_per_s']:,} jobs/s; statuses {status}", flush=True)
        return r
    finally:
        if not keep:
            ec.drop_pg(PROCRASTINATE_DB)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-ours":
        child_ours(sys.argv[2], sys.argv[3], int(sys.argv[4]), "--profile" in sys.argv)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-procrastinate":
        child_procrastinate(sys.argv[2])
        return
    p = argparse.ArgumentParser(description="Dispatch benchmark (see the module docstring)")
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--sqlite-items", type=int, default=20_000, help="0 to skip SQLite")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="items per batch (default: the worker's, Settings.dispatch_batch)")
    p.add_argument("--db-name", default="duecourse_dispatch_bench")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--profile", action="store_true", help="per-statement SQL timings in the workers (adds overhead)")
    p.add_argument("--skip-procrastinate", action="store_true")
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args()
    if args.batch is None:
        from duecourse.config import Settings

        args.batch = Settings().dispatch_batch

    ctx = ec.machine()
    print("machine:", json.dumps(ctx), flush=True)
    report: dict[str, Any] = {"machine": ctx, "now": ec.NOW.isoformat(), "command": "bench/dispatch_bench.py " + " ".join(sys.argv[1:]),
                              "workers": args.workers, "batch": args.batch, "profiled": args.profile}
    url = ec.fresh_pg(args.db_name)
    try:
        report["postgresql"] = run_ours("postgresql", url, args.items, args.workers, args.batch, args.profile)
    finally:
        if not args.keep:
            ec.drop_pg(args.db_name)
    if not args.skip_procrastinate:
        report["procrastinate"] = run_procrastinate(args.items, args.workers, args.keep)
        report["ratio_ours_to_procrastinate"] = round(report["postgresql"]["items_per_s"] / report["procrastinate"]["items_per_s"], 3)
    if args.sqlite_items:
        path = Path(tempfile.gettempdir()) / f"duecourse-dispatch-bench-{args.sqlite_items}.sqlite"
        url = ec.fresh_sqlite(path)
        try:
            report["sqlite"] = run_ours("sqlite", url, args.sqlite_items, 1, args.batch, args.profile)
        finally:
            if not args.keep:
                ec.drop_sqlite(path)
    report["machine"]["load_average_end"] = os.getloadavg()
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / (f"dispatch-{args.items}" + ("-profiled" if args.profile else "") + ".json")
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    pg = report["postgresql"]
    print(f"ours (PostgreSQL, {args.workers} workers): {pg['items_per_s']:,} items/s ({args.items:,} items, {pg['working_seconds']:.1f}s)")
    if "procrastinate" in report:
        pr = report["procrastinate"]
        print(f"procrastinate {pr['version']} ({args.workers} workers, no-op jobs): {pr['items_per_s']:,} jobs/s; "
              f"ours/procrastinate = {report['ratio_ours_to_procrastinate']}")
    if "sqlite" in report:
        print(f"ours (SQLite, 1 worker): {report['sqlite']['items_per_s']:,} items/s ({args.sqlite_items:,} items)")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
