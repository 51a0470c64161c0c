"""CPU per dispatched item: one in-process ``run_due`` over N items, with the CPU seconds of the
worker (this process) and of its PostgreSQL backend (read from /proc) divided by N.

    .venv/bin/python bench/dispatch_cpu.py --items 10000
    .venv/bin/python bench/dispatch_cpu.py --items 10000 --statements     # plus the top statements

Wall-clock rates move with whatever else the machine is doing; CPU per item moves much less, so
this is the figure to compare two versions of the code with (run them one after the other). With
two workers and the server sharing two cores, the rate the dispatch benchmark can reach is about
2 / (worker + server CPU per item). The set-up is the dispatch benchmark's (``prepare_ours``); the
garbage collector's start-up heap is frozen after it, as a worker process does (``--no-freeze``
to skip). PostgreSQL only; Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dispatch_bench
import engine_common as ec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=None, help="items per batch (default: the worker's)")
    p.add_argument("--no-freeze", action="store_true", help="do not freeze the start-up heap")
    p.add_argument("--statements", action="store_true", help="print the statements by total time")
    p.add_argument("--db-name", default="duecourse_dispatch_cpu")
    args = p.parse_args()

    from duecourse.config import Settings
    from duecourse.db import Database
    from duecourse.engine.dispatch import run_due
    from duecourse.engine.runner import freeze_startup_heap

    batch = args.batch or Settings().dispatch_batch
    print("machine:", ec.machine())
    url = ec.fresh_pg(args.db_name)
    try:
        dispatch_bench.prepare_ours("cpu", url, args.items)
        db = Database(url)
        pids = ec.backend_pids(db)
        profile = ec.StatementProfile(db.engine) if args.statements else None
        if not args.no_freeze:
            freeze_startup_heap()
        collecting = {"seconds": 0.0, "runs": 0, "since": 0.0}

        def _gc(phase: str, _info: dict) -> None:  # time spent in the garbage collector
            if phase == "start":
                collecting["since"] = time.perf_counter()
            else:
                collecting["seconds"] += time.perf_counter() - collecting["since"]
                collecting["runs"] += 1

        gc.callbacks.append(_gc)
        server0, worker0, wall0 = ec.backend_cpu_seconds(pids), time.process_time(), time.perf_counter()
        counts = run_due(db, now=ec.NOW, worker="cpu", batch=batch)
        wall = time.perf_counter() - wall0
        gc.callbacks.remove(_gc)
        worker = time.process_time() - worker0
        server = ec.backend_cpu_seconds(pids) - server0
        db.dispose()
        n = args.items
        print(f"{counts} with batch {batch}: {wall:.2f} s ({n / wall:,.0f} items/s, one worker); "
              f"worker CPU {1000 * worker / n:.3f} ms/item, server CPU {1000 * server / n:.3f} ms/item "
              f"({len(pids)} connection(s)); garbage collection {collecting['seconds']:.2f} s in "
              f"{collecting['runs']} runs; two workers on two cores could reach about "
              f"{2 * n / (worker + server):,.0f} items/s")
        if profile:
            for row in profile.top(12):
                print(f"  {row['seconds']:7.3f}s {row['calls']:5d}  {row['statement'][:110]}")
    finally:
        ec.drop_pg(args.db_name)


if __name__ == "__main__":
    main()
