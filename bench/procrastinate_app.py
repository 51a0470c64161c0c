"""The procrastinate app for ``dispatch_bench.py``: one no-op task on its own database.

The connection string comes from ``PROCRASTINATE_BENCH_DSN``. procrastinate is installed into the venv
by the benchmark when missing; it is not a dependency of duecourse.
"""

from __future__ import annotations

import os

import procrastinate

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(
        conninfo=os.environ.get("PROCRASTINATE_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/duecourse_procrastinate_bench"),
        min_size=1,
        max_size=4,
    )
)


@app.task(name="noop", queue="bench")
def noop() -> None:
    return None
