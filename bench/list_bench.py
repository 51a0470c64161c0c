"""Listing benchmark: ``GET /api/v1/accounts`` filtered by ``collection_tab``, first page and deep pages,
through the real app (uvicorn on 127.0.0.1, httpx over a keep-alive connection) on PostgreSQL.

    .venv/bin/python bench/import_bench.py            # once: imports 1,000,000 accounts into duecourse_bench
    .venv/bin/python bench/list_bench.py              # then this

If the database ``--db-name`` has no accounts yet, this imports the cached portfolio first (accounts
and invoices, through ``duecourse import``). Each measured request is repeated ``--repeat`` times after
a warm-up; the median and 95th percentile of the client-side latency are reported. The deep page uses
a cursor pointing 90% of the way through the tab (the same cursor ``next_cursor`` would hold there),
and a cursor chain of ``--follow`` pages is walked from the start to check the cursors work.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import import_bench


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_data(db_name: str, accounts: int, seed: int, cache: Path) -> tuple[str, int]:
    url = import_bench.PG_ADMIN.rsplit("/", 1)[0] + f"/{db_name}"
    try:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT organization_id, COUNT(*) FROM accounts GROUP BY 1 ORDER BY 2 DESC LIMIT 1").fetchone()
    except psycopg.Error:
        row = None
    if row and row[1] >= accounts:
        return url.replace("postgresql://", "postgresql+psycopg://"), row[0]
    files, counts = import_bench.ensure_portfolio(cache, accounts, seed)
    sa_url = import_bench.fresh_pg(db_name).replace("postgresql://", "postgresql+psycopg://")
    org_id = import_bench.setup_org(sa_url)
    for kind in ("accounts", "invoices"):
        print(f"importing {counts[kind]:,} {kind} …", flush=True)
        r = import_bench.run_cli_import(sa_url, org_id, kind, files / f"{kind}.csv")
        if r["exit_code"] != 0:
            raise SystemExit(r["stderr"])
    return sa_url, org_id


def api_key(url: str, org_id: int) -> str:
    from duecourse.db import Database
    from duecourse.tenancy import service as tenancy
    from duecourse.tenancy.models import Role

    db = Database(url)
    try:
        with db.transaction() as session:
            return tenancy.create_api_key(
                session, organization_id=org_id, name="list bench", role=Role.viewer, now=datetime.now(UTC)
            ).key
    finally:
        db.dispose()


def timed(client: httpx.Client, path: str, params: dict[str, Any], repeat: int, warmup: int = 5) -> dict[str, Any]:
    for _ in range(warmup):
        client.get(path, params=params).raise_for_status()
    samples = []
    body: dict[str, Any] = {}
    for _ in range(repeat):
        t = time.perf_counter()
        r = client.get(path, params=params)
        samples.append((time.perf_counter() - t) * 1000)
        r.raise_for_status()
        body = r.json()
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 2),
        "p95_ms": round(samples[max(0, round(0.95 * len(samples)) - 1)], 2),
        "min_ms": round(samples[0], 2),
        "max_ms": round(samples[-1], 2),
        "items": len(body.get("items", [])),
        "n": repeat,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Account list benchmark (see the module docstring)")
    p.add_argument("--db-name", default="duecourse_bench")
    p.add_argument("--accounts", type=int, default=1_000_000, help="the portfolio to import if the database is empty")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache", type=Path, default=HERE / ".cache")
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--follow", type=int, default=20, help="pages of a cursor chain to walk")
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)

    from duecourse.pagination import encode_cursor

    url, org_id = ensure_data(args.db_name, args.accounts, args.seed, args.cache)
    plain = url.replace("+psycopg", "")
    with psycopg.connect(plain) as conn:
        total = conn.execute("SELECT COUNT(*) FROM accounts WHERE organization_id = %s", (org_id,)).fetchone()[0]
        tabs = dict(
            conn.execute(
                "SELECT collection_tab, COUNT(*) FROM accounts WHERE organization_id = %s "
                "AND collection_tab IS NOT NULL GROUP BY 1",
                (org_id,),
            ).fetchall()
        )
    key = api_key(url, org_id)
    port = _free_port()
    # The app refuses to serve PostgreSQL without a proper secret key (docs/settings.md).
    env = {**os.environ, "DUECOURSE_DATABASE_URL": url,
           "DUECOURSE_SECRET_KEY": os.environ.get("DUECOURSE_SECRET_KEY") or secrets.token_urlsafe(48)}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "duecourse.app:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        env=env,
    )  # fmt: skip
    results: dict[str, Any] = {"accounts": total, "tabs": tabs, "machine": import_bench.machine()}
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            cases: list[tuple[str, dict[str, Any]]] = [("all accounts, first page", {"limit": args.limit})]
            with psycopg.connect(plain) as conn:
                for tab, n in sorted(tabs.items(), key=lambda kv: -kv[1]):
                    deep_after = conn.execute(
                        "SELECT id FROM accounts WHERE organization_id = %s AND collection_tab = %s "
                        "ORDER BY id OFFSET %s LIMIT 1",
                        (org_id, tab, int(n * 0.9)),
                    ).fetchone()[0]
                    cases.append((f"tab {tab} ({n:,}), first page", {"collection_tab": tab, "limit": args.limit}))
                    cases.append(
                        (
                            f"tab {tab} ({n:,}), page at 90% (row {int(n * 0.9):,})",
                            {"collection_tab": tab, "limit": args.limit, "cursor": encode_cursor(deep_after)},
                        )
                    )
            results["cases"] = {}
            for name, params in cases:
                r = timed(client, "/api/v1/accounts", params, args.repeat)
                results["cases"][name] = r
                print(f"{name:55} median {r['median_ms']:7.2f} ms  p95 {r['p95_ms']:7.2f} ms  ({r['items']} items)", flush=True)
            # Walk a cursor chain of the largest tab.
            biggest = max(tabs, key=lambda t: tabs[t])
            params = {"collection_tab": biggest, "limit": args.limit}
            seen: set[int] = set()
            t = time.perf_counter()
            for _ in range(args.follow):
                body = client.get("/api/v1/accounts", params=params).raise_for_status().json()
                ids = [a["id"] for a in body["items"]]
                assert not seen.intersection(ids) and ids == sorted(ids)
                seen.update(ids)
                if not body["next_cursor"]:
                    break
                params["cursor"] = body["next_cursor"]
            per_page = (time.perf_counter() - t) * 1000 / args.follow
            results["cursor_chain"] = {"tab": biggest, "pages": args.follow, "mean_ms_per_page": round(per_page, 2)}
            print(f"followed {args.follow} next_cursor pages of tab {biggest}: {per_page:.2f} ms a page on average")
    finally:
        server.terminate()
        server.wait(timeout=30)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"list-{total}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
