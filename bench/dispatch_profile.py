"""cProfile of one in-process ``run_due`` over N items (the dispatch benchmark's set-up, one worker).

    .venv/bin/python bench/dispatch_profile.py --items 2000 > bench/results/dispatch-profile-2000.txt

Prints the counters, the time, the SQL statements by total time (cursor events) and the cProfile
listing by cumulative time. The profiler roughly doubles the Python time; read the shares, not the rate.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dispatch_bench
import engine_common as ec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--db-name", default="duecourse_dispatch_profile")
    args = p.parse_args()

    from duecourse.db import Database
    from duecourse.engine.dispatch import run_due

    print("machine:", ec.machine())
    url = ec.fresh_pg(args.db_name)
    try:
        dispatch_bench.prepare_ours("profile", url, args.items)
        db = Database(url)
        stmts = ec.StatementProfile(db.engine)
        prof = cProfile.Profile()
        t = time.monotonic()
        prof.enable()
        counts = run_due(db, now=ec.NOW, worker="profile")
        prof.disable()
        took = time.monotonic() - t
        db.dispose()
        print(f"{counts} in {took:.2f}s under cProfile ({args.items / took:.0f} items/s)")
        print(f"SQL: {sum(v[0] for v in stmts.totals.values())} statements, "
              f"{sum(v[1] for v in stmts.totals.values()):.2f}s as executed")
        for row in stmts.top(20):
            print(f"  {row['seconds']:7.3f}s {row['calls']:6d}  {row['statement']}")
        pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats("cumulative").print_stats(60)
    finally:
        ec.drop_pg(args.db_name)


if __name__ == "__main__":
    main()
